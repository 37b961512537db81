"""The queue's numbers in the Prometheus text exposition format (version 0.0.4).

`backupmx metrics` prints them; the metrics process (metrics_http.py) serves
the same at GET /metrics. Everything comes from the queue database (read-only),
so the counters survive restarts and any process may render them:

  backupmx_queue_messages{domain,state}              gauge: queue rows per state
  backupmx_queue_bytes{domain}                       gauge: bytes waiting (queued or held)
  backupmx_queue_oldest_seconds{domain}              gauge: age of the oldest waiting message, 0 if none
  backupmx_queue_queueing_since_timestamp_seconds{domain}  gauge: when the domain started queueing (if it is)
  backupmx_last_etrn_timestamp_seconds{domain}       gauge: the last ETRN for the domain (if any)
  backupmx_last_delivery_timestamp_seconds{domain}   gauge: the primary's last 2xx for the domain's mail (if any)
  backupmx_messages_received_total                   counter: messages accepted (the 250 after DATA)
  backupmx_messages_delivered_total                  counter: messages handed to a primary (its 2xx to DATA)
  backupmx_rejects_total{reason}                     counter: SMTP refusals, by reply (replies.py name)
  backupmx_queue_wal_bytes                           gauge: the queue's -wal file (its high-water mark)
  backupmx_queue_wal_uncopied_bytes                  gauge: pages in the WAL no checkpoint copied yet (its work left)

Every configured domain has its queue series, 0 when nothing is queued; a
timestamp series is absent until its event happened once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from backupmx.store_db import DELIVERED, RECEIVED, REJECTS, STATES
from backupmx.store_housekeeping import wal_left_bytes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    """One metric: its name, type, help text and samples ({label: value}, value)."""

    name: str
    kind: str  # gauge | counter
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    return repr(float(value))


def render(families: list[Family]) -> str:
    """The exposition text: # HELP, # TYPE, then one line per sample."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            inside = ",".join(f'{key}="{_escape_label(str(text))}"' for key, text in labels.items())
            lines.append(f"{family.name}{{{inside}}} {_number(value)}" if inside
                         else f"{family.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def collect(store, domains, now: float) -> list[Family]:
    """The families for the queue `store` (a read-only QueueStore, or None when the
    queue does not exist yet) and the configured `domains` (names)."""
    reports = {r.domain: r for r in store.domain_reports()} if store is not None else {}
    counters = store.counters() if store is not None else {}
    messages = Family("backupmx_queue_messages", "gauge", "Queue rows (a message once per domain) by state.")
    size = Family("backupmx_queue_bytes", "gauge", "Bytes of mail waiting (queued or held) for the domain.")
    oldest = Family("backupmx_queue_oldest_seconds", "gauge",
                    "Age of the oldest mail waiting for the domain; 0 when none waits.")
    since = Family("backupmx_queue_queueing_since_timestamp_seconds", "gauge",
                   "Unix time the domain started queueing; absent while nothing waits.")
    etrn = Family("backupmx_last_etrn_timestamp_seconds", "gauge",
                  "Unix time of the last ETRN for the domain; absent if never.")
    delivery = Family("backupmx_last_delivery_timestamp_seconds", "gauge",
                      "Unix time the primary last accepted mail of the domain; absent if never.")
    for domain in sorted(set(domains) | set(reports)):
        report = reports.get(domain)
        for state in STATES:
            messages.add(report.states.get(state, 0) if report else 0, domain=domain, state=state)
        size.add(report.bytes if report else 0, domain=domain)
        oldest.add(max(0, int(now - report.oldest)) if report and report.oldest is not None else 0, domain=domain)
        if report and report.queueing_since is not None:
            since.add(report.queueing_since, domain=domain)
        if report and report.last_etrn is not None:
            etrn.add(report.last_etrn, domain=domain)
        if report and report.last_delivery is not None:
            delivery.add(report.last_delivery, domain=domain)
    received = Family("backupmx_messages_received_total", "counter", "Messages accepted (250 after DATA).")
    received.add(counters.get((RECEIVED, ""), 0))
    delivered = Family("backupmx_messages_delivered_total", "counter",
                       "Messages handed over to a primary (its 2xx after DATA).")
    delivered.add(counters.get((DELIVERED, ""), 0))
    rejects = Family("backupmx_rejects_total", "counter", "SMTP commands refused, by reason (the reply's name).")
    for (name, label), value in counters.items():
        if name == REJECTS:
            rejects.add(value, reason=label)
    wal = Family("backupmx_queue_wal_bytes", "gauge",
                 "Bytes of the queue's -wal file: its high-water mark since it was last emptied.")
    wal.add(_file_size(f"{store.path}-wal") if store is not None else 0)
    uncopied = Family("backupmx_queue_wal_uncopied_bytes", "gauge",
                      "Bytes of WAL pages no checkpoint copied into the database yet: the checkpointer's work left.")
    uncopied.add(wal_left_bytes(store.path) if store is not None else 0)
    return [messages, size, oldest, since, etrn, delivery, received, delivered, rejects, wal, uncopied]


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # no -wal file: every connection closed, or a TRUNCATE emptied it
        return 0
