"""Who an SMTP client is: its address as shown, and the key per-client limits count it under.

- An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack
  listener on `::` reports for an IPv4 client) is that IPv4 address
  everywhere: logs, Received:, per-client limits (RFC 4291 2.5.5.2).
- Per-client limits (max_connections_per_client, max_auth_failures_per_client)
  count an IPv4 client by its address and an IPv6 client by its /64: one
  subscriber usually holds a whole /64 (RFC 6177), so counting single IPv6
  addresses would give each attacker 2**64 tries.
- Greylisting keys a client by its network (network_of): /24 or /64.
"""

import ipaddress

__all__ = ["limit_key", "network_of", "shown_address"]


def shown_address(address: str) -> str:
    """The address as logged and written into Received: (IPv4-mapped IPv6 as plain IPv4)."""
    if ":" not in address:  # no IPv6 address: shown as it is (a parse per connection saved)
        return address
    ip = _parse(address)
    if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address


def limit_key(address: str) -> str:
    """What per-client limits count: "192.0.2.1", or "2001:db8:1:2::/64" for any address of that /64."""
    if ":" not in address:  # not IPv6: counted as it is (the master asks three times per connection)
        return address
    ip = _parse(shown_address(address))
    if ip is None or ip.version == 4:
        return shown_address(address)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def network_of(address: str) -> str:
    """The client's network, as greylisting keys it: "192.0.2.0/24", "2001:db8:1:2::/64".

    A sender's retries come from any host of its pool (the big providers send from
    many addresses of one /24), and an IPv6 subscriber holds a /64. A client that
    is no IP address keys as itself."""
    ip = _parse(shown_address(address))
    if ip is None:
        return shown_address(address)
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False))


def _parse(address: str):
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])  # a scope id (fe80::1%eth0) is not the address
    except ValueError:  # "unknown" (inetd on a pipe), a UNIX socket path
        return None
