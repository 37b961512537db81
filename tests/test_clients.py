"""What a client is called and counted as (backupmx.clients): table tests, no sockets."""

import pytest

from backupmx.clients import limit_key, shown_address


@pytest.mark.parametrize("peer, shown, key", [
    ("192.0.2.7", "192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7", "192.0.2.7"),  # a dual-stack listener's IPv4 client
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::9", "2001:db8:1:2::9", "2001:db8:1:2::/64"),  # the same /64: one client for the limits
    ("2001:db8:1:3::9", "2001:db8:1:3::9", "2001:db8:1:3::/64"),
    ("::1", "::1", "::/64"),
    ("fe80::1%eth0", "fe80::1%eth0", "fe80::/64"),
    ("unknown", "unknown", "unknown"),  # inetd on something that is not TCP
])
def test_shown_address_and_limit_key(peer, shown, key):
    assert shown_address(peer) == shown
    assert limit_key(peer) == key
