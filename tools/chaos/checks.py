"""The invariants a run must keep, as pure functions over what the
database holds and what clients and consumers saw (so they can be tested
on a made-up history), plus the few queries that fetch the database side.

Each check returns a list of Violation; an empty list means it held.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from chaos.history import EVENT_OF, FORBIDDEN, TRANSITIONS, ConsumerLog, Request, TokenRead

# Every check, in the order the report lists them.
CHECKS = (
    "no_slot_over_capacity",
    "slot_status_matches_appointment",
    "no_user_overlap",
    "no_buffer_overlap",
    "event_chain",
    "acknowledged_request_has_one_event",
    "failed_request_has_no_event",
    "copies_got_same_answer",
    "no_unknown_or_internal",
    "consumer_sequence",
    "read_not_older_than_token",
    "api_agrees_with_sql",
    "no_traceback_in_logs",
    "recovered_after_fault",
    "writes_only_on_leader",
)

EXAMPLES = 5


@dataclass(frozen=True)
class Violation:
    check: str
    detail: str


@dataclass(frozen=True)
class SlotRow:
    id: str
    specialist_id: str
    status: str
    start_time: datetime
    end_time: datetime
    capacity: int = 1


@dataclass(frozen=True)
class AppointmentRow:
    id: str
    slot_id: str
    user_id: str
    status: str
    expires_at: datetime | None
    party_size: int = 1
    specialist_id: str = ""
    # Its buffered range (storage/sql/buffers.sql), when it has one.
    buffer_start: datetime | None = None
    buffer_end: datetime | None = None


@dataclass(frozen=True)
class EventRow:
    id: str
    appointment_id: str
    type: str
    old_status: str | None
    new_status: str
    specialist_id: str = ""
    # Its created_at (the transaction's now(), as the appointment's
    # updated_at of the same change) in microseconds since the epoch.
    created_us: int | None = None


@dataclass(frozen=True)
class EventRef:
    """The event a request produced, as the idempotency record says."""

    event_id: str
    type: str
    appointment_id: str
    new_status: str


LIVE = ("HOLD", "CONFIRMED", "NO_SHOW")


def slot_status_for(capacity: int, appts: Sequence[AppointmentRow]) -> str:
    """What a slot's status must be given its live appointments
    (docs/seats.md): AVAILABLE while a seat is free, HOLD when full with a
    hold among them, BOOKED when full of confirmed (or no-show) ones."""
    if sum(a.party_size for a in appts) < capacity:
        return "AVAILABLE"
    return "HOLD" if any(a.status == "HOLD" for a in appts) else "BOOKED"


def _examples(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > EXAMPLES else "")


# -- database state ------------------------------------------------------------------


def check_slots(
    slots: Iterable[SlotRow],
    appointments: Iterable[AppointmentRow],
    now: datetime,
    *,
    user_overlap: bool = True,
) -> list[Violation]:
    """No slot has more seats taken than its capacity; the slot's status
    agrees with its live appointments; no two live appointments of one
    specialist in different slots overlap in their buffered ranges; and
    (when the server checks user overlap) no user holds two overlapping
    live appointments."""
    out: list[Violation] = []
    slot_by_id = {s.id: s for s in slots}
    live: dict[str, list[AppointmentRow]] = defaultdict(list)
    for a in appointments:
        if a.status in LIVE:
            live[a.slot_id].append(a)
    for slot_id, appts in live.items():
        capacity = slot_by_id[slot_id].capacity if slot_id in slot_by_id else 1
        taken = sum(a.party_size for a in appts)
        if taken > capacity:
            out.append(
                Violation(
                    "no_slot_over_capacity",
                    f"slot {slot_id} of capacity {capacity} has {taken} seats taken: "
                    + ", ".join(f"{a.id} ({a.status}, {a.party_size})" for a in appts),
                )
            )
    for slot in slot_by_id.values():
        appts = live.get(slot.id, [])
        if sum(a.party_size for a in appts) > slot.capacity:
            continue
        expected = slot_status_for(slot.capacity, appts)
        if expected != slot.status:
            out.append(
                Violation(
                    "slot_status_matches_appointment",
                    f"slot {slot.id} is {slot.status} but its live appointments are "
                    + (", ".join(f"{a.id} ({a.status})" for a in appts) if appts else "none"),
                )
            )
    by_specialist: dict[str, list[AppointmentRow]] = defaultdict(list)
    for appts in live.values():
        for a in appts:
            if a.buffer_start is not None and a.buffer_end is not None:
                by_specialist[a.specialist_id].append(a)
    for buffered in by_specialist.values():
        buffered.sort(key=lambda a: a.buffer_start or a.buffer_end or datetime.min)
        for i, a1 in enumerate(buffered):
            for a2 in buffered[i + 1 :]:
                assert a1.buffer_end is not None and a2.buffer_start is not None
                if a2.buffer_start >= a1.buffer_end:
                    break
                if a1.slot_id != a2.slot_id:
                    out.append(
                        Violation(
                            "no_buffer_overlap",
                            f"{a1.id} ({a1.status}, {a1.buffer_start:%H:%M}-"
                            f"{a1.buffer_end:%H:%M}) and {a2.id} ({a2.status},"
                            f" {a2.buffer_start:%H:%M}-{a2.buffer_end:%H:%M}) are inside"
                            " each other's buffers",
                        )
                    )
    if user_overlap:
        # The server's own rule: CONFIRMED, or a HOLD that has not lapsed.
        by_user: dict[str, list[tuple[SlotRow, AppointmentRow]]] = defaultdict(list)
        for appts in live.values():
            for a in appts:
                occupying = a.status == "CONFIRMED" or (
                    a.status == "HOLD" and a.expires_at is not None and a.expires_at > now
                )
                if occupying and a.slot_id in slot_by_id:
                    by_user[a.user_id].append((slot_by_id[a.slot_id], a))
        for user_id, items in by_user.items():
            items.sort(key=lambda sa: sa[0].start_time)
            for (s1, a1), (s2, a2) in zip(items, items[1:], strict=False):
                if s2.start_time < s1.end_time:
                    out.append(
                        Violation(
                            "no_user_overlap",
                            f"user {user_id} has overlapping {a1.id} ({a1.status}, "
                            f"{s1.start_time:%H:%M}) and {a2.id} ({a2.status}, "
                            f"{s2.start_time:%H:%M})",
                        )
                    )
    return out


# The status change each event type stands for: (old statuses allowed, new status).
EVENT_STATUS: dict[str, tuple[tuple[str | None, ...], tuple[str, ...]]] = {
    "HELD": ((None,), ("HOLD",)),
    "CONFIRMED": (("HOLD",), ("CONFIRMED",)),
    "CANCELLED": (("HOLD", "CONFIRMED"), ("CANCELLED",)),
    "HOLD_EXPIRED": (("HOLD",), ("CANCELLED",)),
    "NO_SHOW": (("CONFIRMED",), ("NO_SHOW",)),
    "RESCHEDULED": (("HOLD", "CONFIRMED"), ("HOLD", "CONFIRMED")),
}


def check_event_chains(
    events: Iterable[EventRow], appointments: Iterable[AppointmentRow]
) -> list[Violation]:
    """Read in stream order, each appointment's events form an unbroken
    chain of status changes (HELD first; each old status is the previous
    new one) that ends in the appointment's current status."""
    out: list[Violation] = []
    last: dict[str, str] = {}
    for e in events:
        allowed_old, allowed_new = EVENT_STATUS.get(e.type, ((), ()))
        previous = last.get(e.appointment_id)
        if e.old_status != previous or e.old_status not in allowed_old:
            out.append(
                Violation(
                    "event_chain",
                    f"event {e.id} {e.type} of appointment {e.appointment_id} says old status "
                    f"{e.old_status}, but the stream before it left {previous}",
                )
            )
        elif e.new_status not in allowed_new or (
            e.type == "RESCHEDULED" and e.new_status != e.old_status
        ):
            out.append(
                Violation(
                    "event_chain",
                    f"event {e.id} {e.type} moves {e.old_status} -> {e.new_status}",
                )
            )
        last[e.appointment_id] = e.new_status
    for a in appointments:
        if last.get(a.id) != a.status:
            out.append(
                Violation(
                    "event_chain",
                    f"appointment {a.id} is {a.status} but its last event says {last.get(a.id)}",
                )
            )
    return out


# -- requests and answers --------------------------------------------------------------


def check_requests(
    requests: Iterable[Request], produced: dict[str, list[EventRef]]
) -> list[Violation]:
    """Every acknowledged transition maps to exactly one event, of the
    right type, for the appointment (and status) its answer named; and a
    request every copy of which was refused left no event behind."""
    out: list[Violation] = []
    for r in requests:
        if r.op not in TRANSITIONS:
            continue
        refs = produced.get(r.request_id, [])
        ack = r.acknowledged
        if ack is not None:
            if len(refs) != 1:
                out.append(
                    Violation(
                        "acknowledged_request_has_one_event",
                        f"{r.op} {r.request_id} was answered OK but maps to {len(refs)} events",
                    )
                )
                continue
            ref = refs[0]
            wrong = []
            if ref.type != EVENT_OF[r.op]:
                wrong.append(f"type {ref.type}, expected {EVENT_OF[r.op]}")
            if ref.appointment_id != ack.appointment_id:
                wrong.append(f"appointment {ref.appointment_id}, answer said {ack.appointment_id}")
            if ref.new_status != ack.status:
                wrong.append(f"status {ref.new_status}, answer said {ack.status}")
            if wrong:
                out.append(
                    Violation(
                        "acknowledged_request_has_one_event",
                        f"{r.op} {r.request_id} maps to event {ref.event_id} with "
                        + "; ".join(wrong),
                    )
                )
        elif r.answers and all(a.code != "OK" for a in r.answers) and refs:
            out.append(
                Violation(
                    "failed_request_has_no_event",
                    f"{r.op} {r.request_id} was answered "
                    + " / ".join(a.brief() for a in r.answers)
                    + f" but produced event {refs[0].event_id} ({refs[0].type})",
                )
            )
    return out


def check_copies(requests: Iterable[Request]) -> list[Violation]:
    """Every definitive answer to one request_id (all copies, all retries
    that got one) is the same answer."""
    out: list[Violation] = []
    for r in requests:
        answers = r.answers
        if len(answers) > 1 and not all(a.same_as(answers[0]) for a in answers[1:]):
            out.append(
                Violation(
                    "copies_got_same_answer",
                    f"{r.op} {r.request_id} ({len(r.copies)} copies): "
                    + " vs ".join(a.brief() for a in answers),
                )
            )
    return out


def check_codes(
    requests: Iterable[Request],
    consumers: Iterable[ConsumerLog],
    reads: Iterable[TokenRead] = (),
) -> list[Violation]:
    out: list[Violation] = []
    for read in reads:
        bad = [code for code in read.attempts if code in FORBIDDEN]
        if bad:
            out.append(
                Violation(
                    "no_unknown_or_internal",
                    f"reader {read.reader} {read.method} got {', '.join(bad)}: "
                    + "; ".join(read.messages)[:200],
                )
            )
    for r in requests:
        for c in r.copies:
            bad = [code for code, _ in c.attempts if code in FORBIDDEN]
            if bad:
                out.append(
                    Violation(
                        "no_unknown_or_internal",
                        f"{r.op} {r.request_id} got {', '.join(bad)}: "
                        + "; ".join(c.messages)[:200],
                    )
                )
    for log in consumers:
        for message in log.bad_messages:
            out.append(Violation("no_unknown_or_internal", f"consumer {log.name}: {message[:200]}"))
    return out


# -- event consumers -----------------------------------------------------------------------


def check_consumer(
    log: ConsumerLog, table: Sequence[str], settled: set[str] | None = None
) -> list[Violation]:
    """The consumer received exactly the table's sequence (ORDER BY xid,
    seq), from the beginning: no gap, no duplicate, no reordering, nothing
    the table does not hold. At the tail it may lack only events outside
    `settled` (those committed after it was last given time to catch up)."""
    out: list[Violation] = []
    name = log.name
    seen = log.event_ids
    counts = Counter(seen)
    position = {event_id: i for i, event_id in enumerate(table)}
    dups = [e for e, n in counts.items() if n > 1]
    if dups:
        out.append(
            Violation(
                "consumer_sequence",
                f"{name}: {len(dups)} events delivered more than once: {_examples(dups)}",
            )
        )
    unknown = [e for e in counts if e not in position]
    if unknown:
        out.append(
            Violation(
                "consumer_sequence",
                f"{name}: {len(unknown)} events not in the table: {_examples(unknown)}",
            )
        )
    missing = [i for i, e in enumerate(table) if e not in counts]
    if missing:
        last_seen = max((position[e] for e in counts if e in position), default=-1)
        gaps = [i for i in missing if i < last_seen]
        behind = sum(
            1 for i in missing if i > last_seen and (settled is None or table[i] in settled)
        )
        if gaps:
            out.append(
                Violation(
                    "consumer_sequence",
                    f"{name}: gap: {len(gaps)} events skipped while later ones arrived, "
                    f"at table positions {_examples(gaps)} (first {table[gaps[0]]})",
                )
            )
        if behind:
            out.append(
                Violation(
                    "consumer_sequence",
                    f"{name}: never received the last {behind} of {len(table)} events",
                )
            )
    # Order: first deliveries of table events must follow table order.
    firsts: list[int] = []
    done: set[str] = set()
    for e in seen:
        if e in position and e not in done:
            done.add(e)
            firsts.append(position[e])
    inversions = [
        (i, firsts[i - 1], firsts[i]) for i in range(1, len(firsts)) if firsts[i] < firsts[i - 1]
    ]
    if inversions:
        i, before, after = inversions[0]
        out.append(
            Violation(
                "consumer_sequence",
                f"{name}: {len(inversions)} reorderings; delivery {i} is table position "
                f"{after} after position {before}",
            )
        )
    return out


@dataclass
class ReadStats:
    """What the readers' read-backs came to (the report's readers table)."""

    # Tokened reads the check compared with the final history.
    tokened_checked: int = 0
    # Tokened reads it could not compare: the write's answer carried no
    # token, its event is not in the final history (a lost acknowledgement,
    # which acknowledged_request_has_one_event reports), or the read gave up.
    tokened_unchecked: int = 0
    untokened_checked: int = 0
    # Untokened reads that showed a state older than the write (allowed:
    # without a token a read may lag by up to --read-max-lag-seconds).
    untokened_stale: int = 0
    gave_up: int = 0
    by_method: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, object]:
        return {
            "tokened_checked": self.tokened_checked,
            "tokened_unchecked": self.tokened_unchecked,
            "untokened_checked": self.untokened_checked,
            "untokened_stale": self.untokened_stale,
            "gave_up": self.gave_up,
            "by_method": dict(self.by_method),
        }


def check_token_reads(
    reads: Iterable[TokenRead],
    produced: dict[str, list[EventRef]],
    events: Iterable[EventRow],
) -> tuple[list[Violation], ReadStats]:
    """No read that carried the token of a write showed the appointment
    older than that write left it.

    Exact, by the final primary's history: each appointment's events in
    stream order are the states it went through, and each state is named
    by (status, the change's now()), which is what a read returns as
    (status, update_time): the appointment's updated_at and its event's
    created_at are the same transaction's now(). The write's own event
    (through its idempotency record) is at chain position k; the state the
    read showed must be at a position >= k. A read that did not find the
    appointment, or showed a state the history does not have, is a
    violation too. Untokened reads are compared the same way and only
    counted (they may lag)."""
    chains: dict[str, list[EventRow]] = defaultdict(list)
    for e in events:
        chains[e.appointment_id].append(e)
    out: list[Violation] = []
    stats = ReadStats()
    for read in reads:
        stats.by_method[read.method + (" (token)" if read.tokened else "")] += 1
        if not read.code:
            stats.gave_up += 1
        refs = produced.get(read.write_request_id, [])
        chain = chains.get(read.appointment_id, [])
        positions = [i for i, e in enumerate(chain) if refs and e.id == refs[0].event_id]
        if (
            len(refs) != 1
            or not positions
            or not read.code
            or read.code not in ("OK", "NOT_FOUND")
            or (read.tokened and not read.token_issued)
        ):
            if read.tokened:
                stats.tokened_unchecked += 1
            continue
        k = positions[0]
        shown = next(
            (
                i
                for i, e in enumerate(chain)
                if read.code == "OK"
                and e.new_status == read.status
                and e.created_us == read.update_us
            ),
            None,
        )
        if not read.tokened:
            stats.untokened_checked += 1
            if shown is None or shown < k:
                stats.untokened_stale += 1
            continue
        stats.tokened_checked += 1
        if read.code != "OK" or not read.status:
            problem = "did not find the appointment"
        elif shown is None:
            problem = (
                f"showed it {read.status} as of {read.update_us}, a state the final history"
                " does not have"
            )
        elif shown < k:
            problem = (
                f"showed state {shown} ({chain[shown].type} -> {read.status}) of its chain,"
                f" older than the write's own state {k} ({chain[k].type} -> {chain[k].new_status})"
            )
        else:
            continue
        out.append(Violation("read_not_older_than_token", f"{read.brief()}: the read {problem}"))
    return out, stats


def check_api_agrees(
    sql_slots: dict[str, str],
    api_slots: dict[str, str],
    sql_appointments: dict[str, str],
    api_appointments: dict[str, str],
) -> list[Violation]:
    """What the API reports (GetSlot, ListAppointments) is what the table holds."""
    out: list[Violation] = []
    for kind, sql, api in (
        ("slot", sql_slots, api_slots),
        ("appointment", sql_appointments, api_appointments),
    ):
        differ = [k for k in sql if api.get(k) != sql[k]]
        if differ:
            k = differ[0]
            out.append(
                Violation(
                    "api_agrees_with_sql",
                    f"{len(differ)} {kind}s differ, e.g. {k}: SQL {sql[k]}, API {api.get(k)}",
                )
            )
    return out


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S* (\w+) ([\w.]+):")

# Loggers of background work that no client request drives. A traceback
# from these is listed in the report (see background_tracebacks) but is
# not a violation: the rule is about what clients send.
BACKGROUND_LOGGERS = ("asyncpg.pool", "service.sweeper", "service.event_hub")


@dataclass(frozen=True)
class Traceback:
    file: str
    logger: str
    message: str
    exception: str

    def brief(self) -> str:
        return f"{self.file}: after [{self.logger}] {self.message[:120]!r}: {self.exception[:200]}"


def find_tracebacks(path: Path) -> list[Traceback]:
    """Every traceback in a server log, with the log line that printed it
    (its logger and message) and the exception it ends with."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out: list[Traceback] = []
    logger, message = "", ""
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _LOG_LINE.match(line)
        if match:
            logger, message = match.group(2), line[match.end() :].strip()
        if not line.startswith("Traceback (most recent call last)"):
            i += 1
            continue
        # A chain of exceptions ends at the next log line; the last
        # unindented line before it is the exception that was logged.
        exception = ""
        i += 1
        while i < len(lines) and not _LOG_LINE.match(lines[i]):
            text = lines[i]
            if (
                text
                and not text[0].isspace()
                and not text.startswith(("Traceback", "During handling", "The above exception"))
            ):
                exception = text.strip()
            i += 1
        out.append(Traceback(path.name, logger, message, exception))
    return out


def check_logs(paths: Iterable[Path]) -> tuple[list[Violation], list[Traceback]]:
    """Tracebacks in the replicas' logs: violations for anything but the
    background loggers, and the background ones apart."""
    out: list[Violation] = []
    background: list[Traceback] = []
    for path in paths:
        for tb in find_tracebacks(path):
            if tb.logger.startswith(BACKGROUND_LOGGERS):
                background.append(tb)
            else:
                out.append(Violation("no_traceback_in_logs", tb.brief()))
    return out, background


# -- the database side --------------------------------------------------------------------


# -- no write on a node that was not the leader (cluster mode) ----------------------


@dataclass(frozen=True)
class TailCommit:
    """A commit record a node held when it was rewound."""

    node: str
    timeline: int
    lsn: int
    xid: int
    at: datetime


@dataclass(frozen=True)
class RewindWitness:
    """What tools/cluster/rewind_witness.py kept of one rewind: the node's
    timeline, the first LSN its dump covers, and every commit record in it."""

    node: str
    source: str
    timeline: int | None
    covers_from: int | None
    commits: tuple[TailCommit, ...]
    error: str | None
    # From the dump of every record past the divergence point, when it is
    # whole: the transactions whose records touch only system catalogs
    # (relation numbers below 16384) and send no logical message, i.e. the
    # node's own autovacuum and autoanalyze, not a write a client sent.
    catalog_only: frozenset[int] | None = None


_COMMIT = re.compile(
    r"tx:\s+(\d+), lsn: ([0-9A-F]+)/([0-9A-F]+),.*desc: COMMIT(?:_PREPARED)?\b[^0-9]*"
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC"
)


def parse_lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def parse_rewind_witness(node: str, source: str, text: str) -> RewindWitness:
    timeline: int | None = None
    covers_from: int | None = None
    error: str | None = None
    commits: list[TailCommit] = []
    for line in text.splitlines():
        if line.startswith("# timeline "):
            timeline = int(line.split()[2])
        elif line.startswith("# from "):
            covers_from = int(line.split()[2], 16)
        elif line.startswith("# error "):
            error = line[len("# error ") :]
        elif (m := _COMMIT.search(line)) is not None and timeline is not None:
            stamp = m.group(4)
            fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in stamp else "%Y-%m-%d %H:%M:%S"
            commits.append(
                TailCommit(
                    node,
                    timeline,
                    (int(m.group(2), 16) << 32) | int(m.group(3), 16),
                    int(m.group(1)),
                    datetime.strptime(stamp, fmt).replace(tzinfo=UTC),
                )
            )
    if timeline is None and error is None:
        error = "no timeline recorded"
    return RewindWitness(
        node, source, timeline, covers_from, tuple(commits), error, _catalog_only(text)
    )


_TAIL_RECORD = re.compile(r"^# tail: rmgr: (\S+)\s.*?tx:\s+(\d+), lsn: ")
_RELATION = re.compile(r"rel \d+/\d+/(\d+)")
FIRST_NORMAL_OID = 16384
PAGE_IMAGE_RMGRS = ("XLOG",)


def _catalog_only(text: str) -> frozenset[int] | None:
    if "\n# tail-end " not in text:
        return None  # no whole tail: every commit counts as a client's write
    touched_user: set[int] = set()
    seen: set[int] = set()
    for line in text.splitlines():
        m = _TAIL_RECORD.match(line)
        if m is None or m.group(2) == "0":
            continue
        xid = int(m.group(2))
        seen.add(xid)
        if m.group(1) in PAGE_IMAGE_RMGRS:
            # A full-page image changes nothing itself: a client's change of
            # that page has its own Heap or Btree record. Autovacuum's
            # truncation of a table (an xid, its lock, FPIs of the free
            # space and visibility maps, the Storage TRUNCATE, pg_class in
            # place) touches no user page otherwise.
            continue
        if m.group(1) == "LogicalMessage" or any(
            int(rel) >= FIRST_NORMAL_OID for rel in _RELATION.findall(line)
        ):
            touched_user.add(xid)
    return frozenset(seen - touched_user)


@dataclass
class LeaderWrites:
    rewinds: int = 0
    # Commits on a lost tail made while the node was still the leader: never
    # replicated, so never acknowledged (acknowledged_request_has_one_event
    # says whether one was).
    lost_in_flight: int = 0
    # Commits on a lost tail made after another node had been promoted.
    after_promotion: int = 0
    # Of those, the node's own autovacuum/autoanalyze (catalogs only): not
    # a write that reached it.
    maintenance_after_promotion: int = 0


def check_writes_on_leader(
    history: Sequence[Sequence[object]], witnesses: Iterable[RewindWitness]
) -> tuple[list[Violation], LeaderWrites]:
    """A write reached a node that was not the leader exactly when a node
    rewound off timeline T held a commit record at or past T's switch point
    (so the final history does not have it) stamped at or after the moment
    T's successor was promoted, unless the witness's whole tail shows that
    transaction touching system catalogs only (the node's own autovacuum or
    autoanalyze, which no client sent; a logical message, such as the
    service's sync barrier, counts as a client's write).

    `history` is Patroni's ``/history``: ``[T, switch LSN, reason, the next
    timeline's creation time (ISO 8601), its leader]``. A commit past the
    switch point stamped before the promotion was made by the leader itself
    and never reached the synchronous standby (a commit frozen in flight):
    counted, not a violation. A dump that cannot show the whole tail (an
    error, or one starting after the switch point) is a violation: the
    check cannot vouch for what it did not see.
    """
    ends: dict[int, tuple[int, datetime]] = {}
    for line in history:
        timeline, lsn, at = line[0], line[1], line[3]
        assert isinstance(timeline, int) and isinstance(lsn, int) and isinstance(at, str)
        ends[timeline] = (lsn, datetime.fromisoformat(at))
    out: list[Violation] = []
    stats = LeaderWrites()
    seen: set[tuple[str, int, int]] = set()
    for w in witnesses:
        stats.rewinds += 1
        if w.error is not None:
            out.append(Violation("writes_only_on_leader", f"{w.node} {w.source}: {w.error}"))
            continue
        assert w.timeline is not None
        if w.timeline not in ends:
            continue  # its timeline never ended: nothing of it was discarded
        switch, promoted = ends[w.timeline]
        if w.covers_from is None or w.covers_from > switch:
            out.append(
                Violation(
                    "writes_only_on_leader",
                    f"{w.node} {w.source}: the dump starts after timeline "
                    f"{w.timeline}'s switch point {switch:X}",
                )
            )
            continue
        for c in w.commits:
            if c.lsn < switch or (c.node, c.timeline, c.lsn) in seen:
                continue
            seen.add((c.node, c.timeline, c.lsn))
            if c.at >= promoted and w.catalog_only is not None and c.xid in w.catalog_only:
                stats.maintenance_after_promotion += 1
            elif c.at >= promoted:
                stats.after_promotion += 1
                out.append(
                    Violation(
                        "writes_only_on_leader",
                        f"{c.node} committed xid {c.xid} at {c.at.isoformat()} on timeline "
                        f"{c.timeline} at {c.lsn:X}, past its switch point {switch:X}, "
                        f"after timeline {c.timeline + 1} was promoted at {promoted.isoformat()}",
                    )
                )
            else:
                stats.lost_in_flight += 1
    return out, stats


def stream_of(log: ConsumerLog, events: Iterable[EventRow]) -> list[str]:
    """The event ids a consumer should receive, in order: all of them, or
    those its filter selects."""
    return [e.id for e in events if not log.specialist_id or e.specialist_id == log.specialist_id]


@dataclass
class DatabaseState:
    now: datetime
    slots: list[SlotRow]
    appointments: list[AppointmentRow]
    events: list[EventRow]


async def fetch_state(conn: asyncpg.Connection) -> DatabaseState:
    """One consistent snapshot (the sweeper may be expiring holds meanwhile)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _fetch_state(conn)


async def _fetch_state(conn: asyncpg.Connection) -> DatabaseState:
    now = await conn.fetchval("SELECT now()")
    slots = [
        SlotRow(
            r["id"],
            r["specialist_id"],
            r["status"],
            r["start_time"],
            r["end_time"],
            r["capacity"],
        )
        for r in await conn.fetch(
            "SELECT id::text, specialist_id::text, status::text, start_time, end_time,"
            " capacity FROM time_slots WHERE deleted_at IS NULL"
        )
    ]
    appointments = [
        AppointmentRow(
            r["id"],
            r["slot_id"],
            r["user_id"],
            r["status"],
            r["expires_at"],
            r["party_size"],
            r["specialist_id"],
            r["buffer_start"],
            r["buffer_end"],
        )
        for r in await conn.fetch(
            "SELECT id::text, time_slot_id::text AS slot_id, user_id::text, status::text,"
            " expires_at, party_size, specialist_id::text, lower(buffered_range) AS buffer_start,"
            " upper(buffered_range) AS buffer_end FROM appointments"
        )
    ]
    events = [
        EventRow(
            r["id"],
            r["appointment_id"],
            r["event_type"],
            r["old_status"],
            r["new_status"],
            r["specialist_id"],
            r["created_us"],
        )
        for r in await conn.fetch(
            "SELECT id::text, appointment_id::text, event_type, old_status::text,"
            " new_status::text, specialist_id::text,"
            " (extract(epoch FROM created_at) * 1000000)::int8 AS created_us"
            " FROM appointment_events ORDER BY xid, seq"
        )
    ]
    return DatabaseState(now, slots, appointments, events)


async def request_events(
    conn: asyncpg.Connection, keys: Sequence[tuple[str, str]]
) -> dict[str, list[EventRef]]:
    """The events the given requests produced, by request_id, as the
    idempotency records say. `keys` are (caller user id, request_id): the
    caller is unused while request ids are global, and is what a table
    scoped per caller would join on too. Records of refused requests (no
    event) are left out by the join."""
    rows = await conn.fetch(
        "SELECT k.request_id::text AS request_id, e.id::text AS event_id, e.event_type,"
        " e.appointment_id::text AS appointment_id, e.new_status::text AS new_status"
        " FROM idempotency_keys k JOIN appointment_events e ON e.id = k.event_id"
        " WHERE k.request_id = ANY($1::uuid[])",
        [rid for _, rid in keys],
    )
    out: dict[str, list[EventRef]] = defaultdict(list)
    for r in rows:
        out[r["request_id"]].append(
            EventRef(r["event_id"], r["event_type"], r["appointment_id"], r["new_status"])
        )
    return dict(out)
