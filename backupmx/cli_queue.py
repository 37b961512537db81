"""The operator's queue commands: `queue` (and `queue list`), `show`, `flush`,
hold / release / delete / requeue, `verify`, `metrics`, `health`.

Reports open the queue read-only, actions for writing (cli_common.open_store);
a selection is named by queue ids, domains, `-` (ids on stdin), ALL and the
filters --domain, --sender, --older-than (store.Selection). Listings are one
line a message (client-supplied text escaped: cli_common.escaped) or, with
--json, one JSON value; their parsers are in cli.py with the others.
"""

from __future__ import annotations

import os
import sys
import time

from backupmx.addresses import normalize_domain
from backupmx.cli_common import OperatorError, config_of, escaped, one_line, open_store
from backupmx.config import Config
from backupmx.config_values import humanize_age

# Age histogram of `backupmx queue`: (column header, upper bound in seconds).
AGE_BUCKETS = (("<1h", 3600), ("<6h", 6 * 3600), ("<1d", 86400), ("<3d", 3 * 86400), ("3d+", float("inf")))


def cmd_queue(args) -> int:
    if args.action == "list":
        return _queue_list(args)
    config = config_of(args)
    store = open_store(config)
    if store is None:
        if args.json:
            return _print_json([])
        print(f"no mail queued ({config.queue} does not exist yet)")
        return 0
    try:
        now = time.time()
        reports = [r for r in store.domain_reports() if any(r.states.values())]
        histogram = store.age_histogram([bound for _, bound in AGE_BUCKETS], now)
    finally:
        store.close()
    if args.json:
        return _print_json([_summary_json(r, histogram.get(r.domain)) for r in reports])
    if not reports:
        print("no mail queued")
        return 0
    table = [("domain", "messages", "bytes", "oldest") + tuple(h for h, _ in AGE_BUCKETS)
             + ("held", "failed", "expired", "last-etrn", "last-delivery")]
    for r in reports:
        counts = histogram.get(r.domain) or [0] * len(AGE_BUCKETS)
        age = humanize_age(now - r.oldest) if r.oldest is not None else "-"
        table.append((r.domain, str(r.messages), str(r.bytes), age) + tuple(map(str, counts))
                     + tuple(str(r.states[s]) for s in ("held", "failed", "expired"))
                     + (_ago(r.last_etrn, now), _ago(r.last_delivery, now)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        print("  ".join(cells).rstrip())
    return 0


def _ago(unix: int | None, now: float) -> str:
    return "never" if unix is None else humanize_age(now - unix) + "-ago"


def _print_json(value) -> int:
    """One JSON value on stdout (postqueue -j prints one object a line; the SPEC asks for one value)."""
    import json

    json.dump(value, sys.stdout, ensure_ascii=False, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


def _summary_json(report, histogram) -> dict:
    counts = histogram or [0] * len(AGE_BUCKETS)
    return {
        "domain": report.domain, "messages": report.messages, "bytes": report.bytes, "oldest": report.oldest,
        "states": report.states, "ages": dict(zip((h for h, _ in AGE_BUCKETS), counts)),
        "queueing_since": report.queueing_since, "last_etrn": report.last_etrn,
        "last_delivery": report.last_delivery,
    }


def _row_json(row) -> dict:
    return {
        "queue_id": row.queue_id, "domain": row.domain, "state": row.state, "received_at": row.received_at,
        "size": row.size, "sender": row.sender, "recipients": row.recipients, "attempts": row.attempts,
        "last_attempt": row.last_attempt, "next_attempt": row.next_attempt, "last_reply": row.last_reply,
    }


def _message_line(row, now: float) -> str:
    recipients = ",".join(row.recipients)
    return " ".join(
        [
            row.queue_id,
            row.domain,
            row.state,
            humanize_age(now - row.received_at),
            str(row.size),
            escaped(f"<{row.sender}>"),
            escaped(recipients),
            f"attempts={row.attempts}",
            f"last={escaped(row.last_reply or '-')}",
        ]
    )


def _queue_list(args) -> int:
    config = config_of(args)
    domain = _domain_arg(config, args.domain, must_exist=False) if args.domain else None
    selection = _filters(config, args, everything=True, domain=domain)
    store = open_store(config)
    if store is None:
        return _print_json([]) if args.json else 0
    try:
        rows = store.list_messages(selection=selection)
    finally:
        store.close()
    if args.json:
        return _print_json([_row_json(row) for row in rows])
    if args.ids:
        for queue_id in dict.fromkeys(row.queue_id for row in rows):
            print(queue_id)
        return 0
    now = time.time()
    for row in rows:
        print(_message_line(row, now))
    return 0


def _filters(config: Config, args, *, domain: str | None = None, **selection):
    """The Selection of --domain, --sender, --older-than (and queue list's DOMAIN and --state)."""
    from backupmx.config_values import parse_duration
    from backupmx.store import Selection

    if args.filter_domain is not None:
        filter_domain = _domain_arg(config, args.filter_domain, must_exist=False)
        if domain is not None and filter_domain != domain:
            raise OperatorError(f"{domain} and --domain {filter_domain}: two different domains")
        domain = filter_domain
    cutoff = None
    if args.older_than is not None:
        try:
            cutoff = int(time.time() - parse_duration(args.older_than))
        except ValueError as exc:
            raise OperatorError(f"--older-than: {exc}") from None
    return Selection(domain=domain, sender=args.sender, received_before=cutoff,
                     state=getattr(args, "state", None), **selection)


def _domain_arg(config: Config, text: str, *, must_exist: bool = True) -> str:
    try:
        domain = normalize_domain(text)
    except ValueError as exc:
        raise OperatorError(f"{text}: {exc}") from None
    if must_exist and domain not in config.domains:
        raise OperatorError(f"{domain}: not a configured domain (no [domain:{domain}] in {config.path})")
    return domain


def cmd_flush(args) -> int:
    config = config_of(args)
    text = args.domain
    if text.startswith("@"):
        # As ETRN @domain (RFC 1985 section 3): the domain and its configured subdomains.
        parent = _domain_arg(config, text[1:], must_exist=False)
        domains = [d for d in config.domains if d == parent or d.endswith("." + parent)]
        if not domains:
            raise OperatorError(f"{text}: no configured domain matches")
    else:
        domains = [_domain_arg(config, text)]
    store = open_store(config, write=True)
    if store is None:  # nothing was ever queued; do not create the database from here
        pending = {}
    else:
        try:
            pending = store.request_flush(domains)
        finally:
            store.close()
    if any(pending.values()):
        # Without a running `serve` (inetd-only setups) nobody else would deliver;
        # with one, the flush lease lets only one of them do it. It must start:
        # "started" with nobody delivering would be a silent failure.
        from backupmx.inetd import spawn_detached_flusher, wait_until_ready

        problem = wait_until_ready(spawn_detached_flusher(config, report_ready=True))
        if problem is not None:
            raise OperatorError(f"flush: requested, but the flusher could not start: {problem}")
    for domain in domains:
        count = pending.get(domain, 0)
        if count:
            print(f"253 OK, {count} pending messages for node {domain} started")
        else:
            print(f"251 OK, no messages waiting for node {domain}")
    return 0


def _target(config: Config, text: str) -> dict[str, str]:
    """ID|DOMAIN -> {"queue_id": ...} or {"domain": ...}. Queue ids never contain a dot."""
    if "." in text or text.lower() in config.domains:
        return {"domain": _domain_arg(config, text, must_exist=False)}
    if not text.isalnum() or not text.isascii():
        raise OperatorError(f"{text}: neither a queue id nor a domain")
    return {"queue_id": text.upper()}


def cmd_show(args) -> int:
    """postcat-like: the envelope, each domain's row and recipients, the history, then the content.

    A message that left the queue (delivered, deleted, purged) still has its
    history until expired_retention: that is shown instead.
    """
    config = config_of(args)
    target = _target(config, args.target)
    store = open_store(config)
    if store is None:
        raise OperatorError(f"{args.target}: not in the queue ({config.queue} does not exist yet)")
    try:
        if "domain" in target:
            rows = store.list_messages(domain=target["domain"])
            if args.json:
                return _print_json([_row_json(row) for row in rows])
            now = time.time()
            for row in rows:
                print(_message_line(row, now))
            return 0
        queue_id = target["queue_id"]
        detail = store.show(queue_id)
        if detail is None:
            return _show_history(queue_id, store.history(queue_id), args.json)
        if args.json:
            return _print_json(_detail_json(detail))
        _print_detail(detail)
        sys.stdout.flush()
        body = store.open_body(detail.queue_id)
        try:
            out = sys.stdout.buffer
            while chunk := body.read(65536):
                out.write(chunk)
            out.flush()
        finally:
            body.close()
    finally:
        store.close()
    return 0


def _print_detail(detail) -> None:
    print(f"queue_id: {detail.queue_id}")
    print(f"received: {_timestamp(detail.received_at)} from {escaped(detail.client or '-')}"
          f" helo={escaped(detail.helo or '-')}")
    print(f"size: {detail.size} body={detail.body_type} envid={escaped(detail.envid or '-')}"
          f" ret={detail.ret or '-'}")
    print(f"sender: {escaped('<' + detail.sender + '>')}")
    for row in detail.rows:
        print(f"domain: {row.domain} state={row.state} attempts={row.attempts}"
              f" last={escaped(row.last_reply or '-')}")
        for r in row.recipients:
            print(f"  recipient: {escaped('<' + r.address + '>')} state={r.state}"
                  f" last={escaped(r.last_reply or '-')}")
    _print_events(detail.events)
    print()


def _print_events(events) -> None:
    for event in events:
        print(f"event: {_timestamp(event.at)} {event.domain or '-'} {event.what}"
              f" {escaped(event.detail or '-')}")


def _show_history(queue_id: str, events, as_json: bool) -> int:
    """A message no longer in the queue: its history, if any is left."""
    if not events:
        raise OperatorError(f"{queue_id}: no such message in the queue or its history")
    if as_json:
        return _print_json({"queue_id": queue_id, "in_queue": False, "events": [_event_json(e) for e in events]})
    print(f"queue_id: {queue_id} (no longer in the queue: {events[-1].what})")
    _print_events(events)
    return 0


def _event_json(event) -> dict:
    return {"at": event.at, "domain": event.domain, "what": event.what, "detail": event.detail}


def _detail_json(detail) -> dict:
    return {
        "queue_id": detail.queue_id, "in_queue": True, "sender": detail.sender, "received_at": detail.received_at,
        "size": detail.size, "client": detail.client, "helo": detail.helo, "envid": detail.envid, "ret": detail.ret,
        "body_type": detail.body_type,
        "rows": [{"domain": row.domain, "state": row.state, "attempts": row.attempts,
                  "last_attempt": row.last_attempt, "last_reply": row.last_reply, "next_attempt": row.next_attempt,
                  "state_changed": row.state_changed,
                  "recipients": [{"address": r.address, "state": r.state, "last_reply": r.last_reply,
                                  "notify": r.notify, "orcpt": r.orcpt, "dsn_sent": r.dsn_sent}
                                 for r in row.recipients]}
                 for row in detail.rows],
        "events": [_event_json(e) for e in detail.events],
    }


def _verify_target(text: str | None) -> str | None:
    """ADDRESS|DOMAIN|ALL -> the verify_cache key, the domain, or None (everything)."""
    if text is None or text == "ALL":
        return None
    from backupmx.verify import cache_key

    local, at, domain = text.strip("<>").rpartition("@")
    try:
        domain = normalize_domain(domain)
    except ValueError as exc:
        raise OperatorError(f"{text}: {exc}") from None
    return cache_key(f"{local}@{domain}", domain) if at else domain


def cmd_verify(args) -> int:
    """`verify list [ADDRESS|DOMAIN]`, `verify flush ADDRESS|DOMAIN|ALL`: the callout cache (recipients = verify)."""
    config = config_of(args)
    target = _verify_target(args.target)
    store = open_store(config, write=args.action == "flush")
    if store is None:
        return 0 if args.action == "list" else 1
    try:
        if args.action == "flush":
            count = store.flush_verify(target)
            print(f"verify flush: {args.target}: {count} answer(s) forgotten")
            return 0
        now = time.time()
        for answer in store.verify_answers(target):
            left = answer.expires - now
            expiry = f"expires={humanize_age(left)}" if left > 0 else f"stale={humanize_age(-left)}"
            print(f"{escaped(answer.address)} {answer.result} {expiry} checked={humanize_age(now - answer.checked)}"
                  f" reply={escaped(answer.reply)}")
    finally:
        store.close()
    return 0


def _timestamp(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(unix))


# The states each action applies to (store_operator: rows in other states are left alone).
_ACTION_STATES = {"hold": ("queued",), "release": ("held",), "requeue": ("held", "failed", "expired"),
                  "delete": ("queued", "held", "failed", "expired")}
_ACTION_DONE = {"hold": "held", "release": "released", "requeue": "requeued", "delete": "deleted"}


def _selection_of(config: Config, args):
    """The Selection the targets (ID, DOMAIN, `-`, ALL) and the filters name."""
    queue_ids, domains, everything = set(), set(), False
    for text in args.targets:
        if text == "ALL":
            everything = True
        elif text == "-":
            queue_ids |= _ids_from_stdin()
        else:
            target = _target(config, text)
            (queue_ids if "queue_id" in target else domains).add(target.get("queue_id") or target["domain"])
    selection = _filters(config, args, queue_ids=frozenset(queue_ids), domains=frozenset(domains),
                         everything=everything)
    if selection.empty:
        raise OperatorError(f"{args.command}: name the mail: ID, DOMAIN, - (IDs on stdin), ALL,"
                            " or --domain/--sender/--older-than")
    return selection


def _ids_from_stdin() -> set[str]:
    """postsuper's `-`: queue ids on stdin, one a line; the first word of a line counts,
    so `backupmx queue list` output can be piped in as it is."""
    ids = set()
    for number, line in enumerate(sys.stdin, 1):
        words = line.split()
        if not words:
            continue
        if not (words[0].isascii() and words[0].isalnum()):
            raise OperatorError(f"stdin line {number}: {escaped(words[0])}: not a queue id")
        ids.add(words[0].upper())
    return ids


def cmd_operator_action(args) -> int:
    """hold / release / delete / requeue: select the rows, (delete: ask), act, say how many."""
    config = config_of(args)
    selection = _selection_of(config, args)
    store = open_store(config, write=True)
    if store is None:
        raise OperatorError(f"{args.command}: nothing in the queue ({config.queue} does not exist yet)")
    try:
        rows = store.select(selection, _ACTION_STATES[args.command])
        if args.command == "delete" and rows and not args.yes:
            messages = len({row.queue_id for row in rows})
            what = f"{messages} message(s) ({len(rows)} queue row(s))"
            if "-" in args.targets or not (sys.stdin and sys.stdin.isatty()):
                raise OperatorError(f"delete: refusing to delete {what} without --yes (stdin is not a terminal)")
            try:
                answer = input(f"delete {what} from the queue, with no bounce? [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        count = getattr(store, args.command)(rows)
    finally:
        store.close()
    messages = len({row.queue_id for row in rows})
    print(f"{args.command}: {_ACTION_DONE[args.command]} {count} queue row(s) of {messages} message(s)")
    if not count:
        print(f"backupmx: {args.command}: nothing matched", file=sys.stderr)
        return 1
    return 0


def cmd_metrics(args) -> int:
    """Prometheus text exposition of the queue (read-only)."""
    from backupmx import metrics

    config = config_of(args)
    store = open_store(config)
    try:
        families = metrics.collect(store, config.domains, time.time())
    finally:
        if store is not None:
            store.close()
    sys.stdout.write(metrics.render(families))
    return 0


def cmd_health(args) -> int:
    """Nagios/Icinga plugin: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (never 1 for a mistake)."""
    from backupmx import health
    from backupmx.config_values import parse_duration

    try:
        thresholds = health.Thresholds(
            warn_age=parse_duration(args.warn_age) if args.warn_age else health.DEFAULT_WARN_AGE,
            max_age=parse_duration(args.max_age) if args.max_age else health.DEFAULT_MAX_AGE,
            warn_messages=args.warn_messages, max_messages=args.max_messages)
        config = config_of(args)
        if not os.path.exists(config.queue):
            status, line = health.unknown(f"{config.queue} does not exist (has the server ever started?)")
        else:
            store = open_store(config)
            try:
                status, line = health.evaluate(store.domain_reports(), thresholds, time.time())
            finally:
                store.close()
    except Exception as exc:  # noqa: BLE001 - a plugin says UNKNOWN, whatever went wrong
        status, line = health.unknown(one_line(exc))
    print(line)
    return status
