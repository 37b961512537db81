"""`backupmx health`: a Nagios/Icinga plugin (Monitoring Plugins Development Guidelines).

One line, `BACKUPMX OK|WARNING|CRITICAL|UNKNOWN - text | perfdata`, and the
exit status 0, 1, 2 or 3. It looks at the mail waiting (queued or held, as
queue_summary counts it): how much, and how old the oldest is. Old waiting
mail is the alarm a backup MX needs most: the primary is down for long, or
forgot to poll (the text names the domain and its last ETRN). UNKNOWN when
the queue cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass

from backupmx.config_values import humanize_age

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATUS_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

# Defaults when no threshold is given (README, "choices"): the primary polls
# every 15 minutes in contrib/primary; mail waiting 4 hours means it is down
# or does not poll (WARNING), a day is half-way to nothing (CRITICAL) with the
# default queue_lifetime of 5 days. Counts have no default: it depends on the site.
DEFAULT_WARN_AGE = 4 * 3600.0
DEFAULT_MAX_AGE = 86400.0


@dataclass(frozen=True)
class Thresholds:
    warn_age: float | None = DEFAULT_WARN_AGE
    max_age: float | None = DEFAULT_MAX_AGE
    warn_messages: int | None = None
    max_messages: int | None = None


def _perf(label: str, value: int, unit: str, warn, crit) -> str:
    """'label'=value[unit];[warn];[crit];0 (thresholds as plain numbers in the same unit)."""
    def number(x):
        return "" if x is None else str(int(x))
    return f"{label}={value}{unit};{number(warn)};{number(crit)};0"


def unknown(reason: str) -> tuple[int, str]:
    return UNKNOWN, f"BACKUPMX UNKNOWN - {' '.join(reason.split())}"


def evaluate(reports, thresholds: Thresholds, now: float) -> tuple[int, str]:
    """(exit status, the plugin's line) for the store's domain_reports()."""
    waiting = [r for r in reports if r.messages]
    messages = sum(r.messages for r in waiting)
    size = sum(r.bytes for r in waiting)
    failed = sum(r.states.get("failed", 0) + r.states.get("expired", 0) for r in reports)
    oldest = min(waiting, key=lambda r: r.oldest, default=None)
    age = max(0, int(now - oldest.oldest)) if oldest is not None else 0
    t = thresholds
    status = OK
    if (t.max_age is not None and age > t.max_age) or (t.max_messages is not None and messages > t.max_messages):
        status = CRITICAL
    elif (t.warn_age is not None and age > t.warn_age) or (
            t.warn_messages is not None and messages > t.warn_messages):
        status = WARNING
    if oldest is None:
        text = "no mail waiting"
    else:
        etrn = ("no ETRN yet" if oldest.last_etrn is None
                else f"last ETRN {humanize_age(now - oldest.last_etrn)} ago")
        text = (f"{messages} message(s) waiting for {len(waiting)} domain(s), oldest {humanize_age(age)}"
                f" ({oldest.domain}, {etrn})")
    if failed:
        text += f"; {failed} failed or expired kept"
    perfdata = " ".join([
        _perf("messages", messages, "", t.warn_messages, t.max_messages),
        _perf("oldest", age, "s", t.warn_age, t.max_age),
        _perf("bytes", size, "B", None, None),
        _perf("failed", failed, "", None, None),
    ])
    return status, f"BACKUPMX {STATUS_NAMES[status]} - {text} | {perfdata}"
