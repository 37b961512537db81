"""A pipelined flush that ends, or loses its connection, with the next message announced.

With PIPELINING the next message's XFORWARD/MAIL/RCPT/DATA go out in the
same write as this message's end of data (flush_session.Flush.announce): from
then on the primary may be waiting for that message's content. These tests
drive the paths where it never comes, against the real sink (tests/sink.py)
on 127.0.0.1 and a real SQLite queue, and check three things each time:

- what the primary received: no QUIT (nor any other command) where it takes
  content, and no message's content half-way into another's (every body the
  sink got is one queued message's, whole);
- what stays queued, and with which attempts and reply;
- that the next flush delivers each message exactly once.
"""

import collections
import os
import random
import re
import signal
import sys
import threading

from backupmx.flush_sharing import EXTRA_CONNECTION_MIN_MESSAGES
from backupmx.store import QueueStore

sys.path.insert(0, os.path.dirname(__file__))
from conftest import pending_flushes, wait_for  # noqa: E402
from test_flusher import (DOMAIN, domain_config, enqueue, flush, number_of, numbered,  # noqa: E402,F401 - store is a fixture
                          rows, store)


def seeded():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    return seed, random.Random(seed)


def data_commands(session):
    return sum(1 for c in session.commands if c.upper() == "DATA")


# The commands of one message, as announce() sends them behind an end of data.
ANNOUNCED_GROUP = re.compile(rb"(XFORWARD [^\r\n]*\r\n)*MAIL FROM:[^\r\n]*\r\n(RCPT TO:[^\r\n]*\r\n)+DATA\r\n")


def assert_sessions_ended_cleanly(sink):
    """Each session ended in one of three ways, and never with a command (QUIT) or another
    message where the primary takes content: QUIT after its last message's final reply;
    closed after an announced message's commands (answered or not), before any content;
    or, muted, closed with exactly those commands as all the primary got after its last reply."""
    sink.wait_idle()
    for session in sink.sessions:
        taken = sum(1 for d in sink.deliveries if d.session == session.number)
        data = [i for i, c in enumerate(session.commands) if c.upper() == "DATA"]
        after = [c.split(" ")[0].upper() for c in session.commands[data[taken - 1] + 1 if taken else 1:]]
        if session.unanswered is not None:  # mute_after_eod: all it got after its last reply
            assert ANNOUNCED_GROUP.fullmatch(session.unanswered) and after == [], session
        elif after != ["QUIT"]:  # the primary may not have read all of the group before the close
            assert after and all(verb in ("XFORWARD", "MAIL", "RCPT", "DATA") for verb in after), session
            assert "DATA" not in after[:-1] and session.unfinished in (None, b""), session
        else:
            assert session.unfinished is None, session


def assert_each_delivered_once(sink, count):
    assert sorted(number_of(d) for d in sink.deliveries) == list(range(count))
    assert all(d.body == numbered(number_of(d)) for d in sink.deliveries)  # whole, and its own


# -- should_stop() turns true with the next message announced --------------------------


def test_a_flush_stopped_between_messages_closes_the_connection_under_the_announced_message(store, sink):
    # SIGTERM or a reload of a flush worker: should_stop() is asked between messages, when
    # the next one's commands went out with the last end of data. A QUIT now would be
    # read as that message's content: the connection is closed instead, and the message
    # stays queued as it was (nothing of it was accepted: no attempt, no reply recorded).
    # The primary answers nothing after that last final reply (mute_after_eod), so that
    # all the flusher sends it from then on is on record, and no read-ahead reply of the
    # primary's can keep a QUIT from going out (PrimaryClient.send's own guard).
    seed, rng = seeded()
    count = 10  # below EXTRA_CONNECTION_MIN_MESSAGES: one connection
    stop_after = rng.randint(1, count - 1)
    sink.behaviour, sink.drop_after = "mute_after_eod", stop_after
    sink.xforward = True  # IDENT= names the queue id of each message's group
    ids = [enqueue(store, numbered(i)) for i in range(count)]
    counts = flush(store, domain_config(sink), should_stop=lambda: len(sink.deliveries) >= stop_after)
    assert counts == {"messages": stop_after, "delivered": stop_after, "deferred": 0, "failed": 0}, seed
    assert_sessions_ended_cleanly(sink)
    (session,) = sink.sessions
    assert b"IDENT=%s " % ids[stop_after].encode() in session.unanswered, (seed, session.unanswered)
    left = rows(store)
    assert sorted(left) == sorted(ids[stop_after:]), seed
    assert all((row.state, row.attempts, row.last_reply) == ("queued", 0, None) for row in left.values()), seed
    assert pending_flushes(store.path) == [DOMAIN]  # asked for again: the next flush worker resumes
    sink.behaviour = "normal"
    assert flush(store, domain_config(sink))["delivered"] == count - stop_after
    assert_each_delivered_once(sink, count)
    assert_sessions_ended_cleanly(sink)
    assert rows(store) == {}


def test_a_flush_stopped_with_both_connections_busy_loses_and_repeats_nothing(store, sink):
    # With the extra connection each connection may hold a message of its own announced
    # when should_stop() turns true: both are closed under it, neither message is lost.
    # should_stop() turns true with a session's `stop_after`th message, after which that
    # session answers nothing more; the other one stops at its next message.
    seed, rng = seeded()
    count = EXTRA_CONNECTION_MIN_MESSAGES + 10
    stop_after = rng.randint(1, (count - 4) // 2)  # both connections still have work then

    def should_stop():
        per_session = collections.Counter(d.session for d in sink.deliveries)
        return max(per_session.values(), default=0) >= stop_after

    sink.behaviour, sink.drop_after = "mute_after_eod", stop_after
    ids = [enqueue(store, numbered(i)) for i in range(count)]
    counts = flush(store, domain_config(sink), should_stop=should_stop)
    delivered = len(sink.deliveries)
    assert counts == {"messages": delivered, "delivered": delivered, "deferred": 0, "failed": 0}, seed
    assert len(sink.sessions) == 2, seed
    assert_sessions_ended_cleanly(sink)
    assert any(s.unanswered for s in sink.sessions), seed
    left = rows(store)
    assert sorted(left) == sorted(set(ids) - {ids[number_of(d)] for d in sink.deliveries}), seed
    assert all((row.state, row.attempts) == ("queued", 0) for row in left.values()), seed
    assert pending_flushes(store.path) == [DOMAIN]
    sink.behaviour = "normal"
    flush(store, domain_config(sink))
    assert_each_delivered_once(sink, count)
    assert_sessions_ended_cleanly(sink)
    assert rows(store) == {}


def test_the_extra_connection_delivers_what_it_announced_after_the_work_list_ran_out(store, sink):
    # The end of the work list races the extra connection: it announced a message (taken
    # from the list) and the main connection then finds the list empty and is done. The
    # extra connection must still deliver that message, not QUIT (or close) under it.
    count = EXTRA_CONNECTION_MIN_MESSAGES
    ids = [enqueue(store, numbered(i)) for i in range(count)]
    held = threading.Event()
    main_thread = threading.current_thread()  # where deliver_domain runs the main connection
    asked = threading.Condition()
    main_asked_at = []  # how many messages the primary had at each of its should_stop() calls

    def should_stop():
        if threading.current_thread() is main_thread:
            with asked:
                main_asked_at.append(len(sink.deliveries))
                asked.notify_all()
        return False

    def steer(number, delivery):
        # The main connection's first message is message 0 (it takes it before the extra
        # connection is up). Its final reply waits until the extra connection has sent a
        # message's commands. The extra connection's first final reply waits until the main
        # one delivered everything else and then asked should_stop() once more, just before
        # it finds the list empty: the message the extra connection announced is the last.
        if number_of(delivery) == 0:
            sink.wait(lambda: any("RCPT" in " ".join(s.commands) for s in sink.sessions
                                  if s.number != delivery.session), timeout=10)
        elif delivery.session != sink.deliveries[0].session and not held.is_set():
            held.set()
            with asked:
                assert asked.wait_for(lambda: main_asked_at and main_asked_at[-1] >= count - 1, timeout=10)

    sink.on_delivery = steer
    counts = flush(store, domain_config(sink), should_stop=should_stop)
    assert held.is_set() and len(sink.sessions) == 2
    main, extra = sink.deliveries[0].session, sink.deliveries[-1].session
    assert extra != main  # the list's last message went on the extra connection, after the main one ran out
    assert [d.session for d in sink.deliveries].count(extra) == 2
    assert counts == {"messages": count, "delivered": count, "deferred": 0, "failed": 0}
    assert_each_delivered_once(sink, count)
    assert_sessions_ended_cleanly(sink)
    assert all(s.commands[-1].upper() == "QUIT" for s in sink.sessions)
    assert rows(store) == {} and len(ids) == count


def test_a_reload_stops_a_flush_worker_with_a_message_announced_and_the_next_generation_resumes(server_factory,
                                                                                             tmp_path, sink):
    # A real server: SIGHUP retires the flush worker (SIGTERM) while the primary holds the
    # final reply to the `stop_after`th message, whose end of data carried the next one's
    # commands. The worker stops at its next should_stop(): it closes the connection under
    # the announced message (the primary, answering nothing more, gets no QUIT as its
    # content), and the next generation's flush worker delivers the rest, each once.
    seed, rng = seeded()
    count = 6
    stop_after = rng.randint(1, count - 1)
    sink.behaviour, sink.drop_after, sink.xforward = "mute_after_eod", stop_after, True
    queue = tmp_path / "queue.db"
    with QueueStore(str(queue)) as store:
        ids = [enqueue(store, numbered(i)) for i in range(count)]
        store.request_flush([DOMAIN])
    holding, release = threading.Event(), threading.Event()

    def hold_the_reply(number, delivery):
        if number == stop_after:
            sink.behaviour = "normal"  # for the sessions after this one
            holding.set()
            release.wait(10)

    sink.on_delivery = hold_the_reply
    try:
        server = server_factory(queue=queue, primary_port=sink.port, timeout="5s")
        assert holding.wait(10), seed
        server.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in server.log(), 5), server.log()  # after the old worker's SIGTERM
    finally:
        release.set()
    sink.wait_for(count, timeout=10)
    with QueueStore(str(queue)) as store:
        assert wait_for(lambda: rows(store) == {}, 5), (seed, rows(store))
    assert_each_delivered_once(sink, count)
    assert_sessions_ended_cleanly(sink)
    retired = sink.sessions[0]
    assert sum(1 for d in sink.deliveries if d.session == retired.number) == stop_after, seed
    assert b"IDENT=%s " % ids[stop_after].encode() in retired.unanswered, (seed, retired.unanswered)
    assert all(s.commands[-1].upper() == "QUIT" for s in sink.sessions[1:]), seed
    assert "flush-interrupted" in server.log(), seed


# -- the connection is lost with the next message announced --------------------------------


def test_a_421_with_the_next_message_announced_defers_both_and_the_next_flush_delivers_them(store, sink):
    # The primary answers the 3rd content of each session with 421 (closing the channel,
    # RFC 5321 3.8) while the next message's commands are behind that content: the message
    # in flight and the announced one are both deferred with the 421 (record_withdrawn),
    # attempts counted, and the next flush delivers each of them once.
    sink.behaviour, sink.drop_after = "eod_421", 3
    ids = [enqueue(store, numbered(i)) for i in range(10)]
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": 10, "delivered": 6, "deferred": 4, "failed": 0}
    assert [(number_of(d), d.session) for d in sink.deliveries] == [(0, 1), (1, 1), (4, 2), (5, 2), (8, 3), (9, 3)]
    assert [s.pipelined for s in sink.sessions] == [3, 3, 1]  # 2 and 6 had 3 and 7 announced behind them
    left = rows(store)
    assert sorted(left) == sorted(ids[i] for i in (2, 3, 6, 7))
    for row in left.values():
        assert (row.state, row.attempts) == ("queued", 1), row
        assert row.last_reply.startswith("421 4.3.2 primary.test Service shutting down"), row.last_reply
    sink.behaviour = "normal"
    assert flush(store, domain_config(sink)) == {"messages": 4, "delivered": 4, "deferred": 0, "failed": 0}
    assert_each_delivered_once(sink, 10)
    assert rows(store) == {}


def test_a_message_deleted_while_announced_is_never_sent_and_the_rest_go_once(store, sink):
    # The operator deletes a message after its commands went out with the previous end of
    # data: the primary has answered its DATA with 354 and waits for content there is no
    # more of (_Gone). The connection is closed under it (the primary discards the
    # transaction); the messages after it go on a new connection, once each.
    seed, rng = seeded()
    count = 10
    deleted = rng.randint(1, count - 2)
    ids = [enqueue(store, numbered(i)) for i in range(count)]

    def delete_the_announced_one(number, delivery):
        if number_of(delivery) == deleted - 1:  # its end of data carried `deleted`'s commands
            with QueueStore(store.path) as operator:  # the sink's thread: a connection of its own
                assert operator.delete(queue_id=ids[deleted]) == 1

    sink.on_delivery = delete_the_announced_one
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": count, "delivered": count - 1, "deferred": 0, "failed": 0}, seed
    assert sorted(number_of(d) for d in sink.deliveries) == [i for i in range(count) if i != deleted], seed
    assert all(d.body == numbered(number_of(d)) for d in sink.deliveries), seed
    assert_sessions_ended_cleanly(sink)
    first, second = sink.sessions
    assert data_commands(first) == deleted + 1 and first.unfinished == b"", seed
    assert {d.session for d in sink.deliveries if number_of(d) > deleted} == {second.number}, seed
    assert rows(store) == {}
