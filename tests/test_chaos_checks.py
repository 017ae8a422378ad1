"""The chaos suite's checkers catch what they exist to catch: each is fed a
made-up history with one kind of damage and must report it, and must stay
quiet on the undamaged version."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from chaos import checks
from chaos.checks import AppointmentRow, EventRef, EventRow, SlotRow
from chaos.history import Answer, ConsumerLog, Copy, Request, TokenRead

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def slot(i: int, status: str, specialist: str = "sp1") -> SlotRow:
    start = NOW + timedelta(hours=i)
    return SlotRow(f"s{i}", specialist, status, start, start + timedelta(minutes=30))


def appt(
    ident: str, slot_id: str, status: str, user: str = "u1", expires: datetime | None = None
) -> AppointmentRow:
    if status == "HOLD" and expires is None:
        expires = NOW + timedelta(minutes=5)
    return AppointmentRow(ident, slot_id, user, status, expires)


def names(violations: list[checks.Violation]) -> list[str]:
    return [v.check for v in violations]


# -- database state --------------------------------------------------------------------


def test_consistent_slots_pass() -> None:
    slots = [slot(0, "HOLD"), slot(1, "BOOKED"), slot(2, "AVAILABLE"), slot(3, "BOOKED")]
    appts = [
        appt("a0", "s0", "HOLD"),
        appt("a1", "s1", "CONFIRMED", user="u2"),
        appt("a2", "s2", "CANCELLED"),
        appt("a3", "s3", "NO_SHOW"),
    ]
    assert checks.check_slots(slots, appts, NOW) == []


def test_double_booking_is_reported() -> None:
    slots = [slot(0, "BOOKED")]
    appts = [appt("a0", "s0", "CONFIRMED", "u1"), appt("a1", "s0", "HOLD", "u2")]
    found = checks.check_slots(slots, appts, NOW)
    assert names(found) == ["no_slot_over_capacity"]
    assert "a0" in found[0].detail and "a1" in found[0].detail


def test_slot_status_disagreeing_with_its_appointment_is_reported() -> None:
    slots = [slot(0, "AVAILABLE"), slot(1, "HOLD"), slot(2, "HOLD")]
    appts = [appt("a0", "s0", "CONFIRMED"), appt("a2", "s2", "CONFIRMED", user="u2")]
    found = checks.check_slots(slots, appts, NOW)
    assert names(found) == ["slot_status_matches_appointment"] * 3


def test_user_overlap_is_reported_but_not_for_a_lapsed_hold() -> None:
    a = SlotRow("x", "sp1", "BOOKED", NOW, NOW + timedelta(minutes=30))
    b = SlotRow("y", "sp2", "HOLD", NOW + timedelta(minutes=15), NOW + timedelta(minutes=45))
    overlapping = [appt("a0", "x", "CONFIRMED"), appt("a1", "y", "HOLD")]
    assert names(checks.check_slots([a, b], overlapping, NOW)) == ["no_user_overlap"]
    lapsed = [appt("a0", "x", "CONFIRMED"), appt("a1", "y", "HOLD", expires=NOW)]
    assert checks.check_slots([a, b], lapsed, NOW) == []
    assert checks.check_slots([a, b], overlapping, NOW, user_overlap=False) == []


def test_event_chains() -> None:
    events = [
        EventRow("e1", "a1", "HELD", None, "HOLD"),
        EventRow("e2", "a1", "RESCHEDULED", "HOLD", "HOLD"),
        EventRow("e3", "a1", "CONFIRMED", "HOLD", "CONFIRMED"),
        EventRow("e4", "a1", "NO_SHOW", "CONFIRMED", "NO_SHOW"),
        EventRow("e5", "a2", "HELD", None, "HOLD"),
        EventRow("e6", "a2", "HOLD_EXPIRED", "HOLD", "CANCELLED"),
    ]
    final = [appt("a1", "s1", "NO_SHOW"), appt("a2", "s2", "CANCELLED")]
    assert checks.check_event_chains(events, final) == []
    # A lost CONFIRMED event breaks the chain at NO_SHOW.
    lost = [e for e in events if e.id != "e3"]
    found = checks.check_event_chains(lost, final)
    assert names(found) == ["event_chain"] and "e4" in found[0].detail
    # The table says CONFIRMED but no event says so.
    found = checks.check_event_chains(events[:2], [appt("a1", "s1", "CONFIRMED")])
    assert names(found) == ["event_chain"] and "a1" in found[0].detail
    # Events delivered out of order break the chain too.
    swapped = [events[0], events[2], events[1], *events[3:]]
    assert "event_chain" in names(checks.check_event_chains(swapped, final))


# -- requests and answers ---------------------------------------------------------------------


def request(
    op: str, rid: str, *answers: Answer | None, attempts: list[str] | None = None
) -> Request:
    r = Request(rid, op, "client-0", "u1", 0.0)
    for a in answers:
        r.copies.append(
            Copy([(c, 0) for c in (attempts or [])] + ([(a.code, 0)] if a else []), [], a)
        )
    return r


HELD = Answer("OK", "", "a1", "HOLD", "s1")


def test_acknowledged_request_maps_to_one_event_of_the_right_type() -> None:
    ok = request("HoldSlot", "r1", HELD)
    good = {"r1": [EventRef("e1", "HELD", "a1", "HOLD")]}
    assert checks.check_requests([ok], good) == []
    assert names(checks.check_requests([ok], {})) == ["acknowledged_request_has_one_event"]
    two = {"r1": [EventRef("e1", "HELD", "a1", "HOLD"), EventRef("e2", "HELD", "a1", "HOLD")]}
    assert names(checks.check_requests([ok], two)) == ["acknowledged_request_has_one_event"]
    wrong_type = {"r1": [EventRef("e1", "CONFIRMED", "a1", "HOLD")]}
    found = checks.check_requests([ok], wrong_type)
    assert names(found) == ["acknowledged_request_has_one_event"]
    assert "expected HELD" in found[0].detail
    other_appointment = {"r1": [EventRef("e1", "HELD", "a9", "HOLD")]}
    assert names(checks.check_requests([ok], other_appointment)) == [
        "acknowledged_request_has_one_event"
    ]


def test_refused_request_must_leave_no_event() -> None:
    refused = request("HoldSlot", "r2", Answer("FAILED_PRECONDITION", "SLOT_UNAVAILABLE"))
    assert checks.check_requests([refused], {}) == []
    found = checks.check_requests([refused], {"r2": [EventRef("e1", "HELD", "a1", "HOLD")]})
    assert names(found) == ["failed_request_has_no_event"]
    # Gave up (no definitive answer): the outcome is unknown, so either is fine.
    unknown = request("HoldSlot", "r3", None, attempts=["UNAVAILABLE"])
    assert checks.check_requests([unknown], {"r3": [EventRef("e1", "HELD", "a1", "HOLD")]}) == []
    # Reads have no request id and no event.
    assert checks.check_requests([request("GetSlot", "", Answer("OK"))], {}) == []


def test_copies_of_a_request_must_get_the_same_answer() -> None:
    same = request("HoldSlot", "r1", HELD, HELD)
    assert checks.check_copies([same]) == []
    raced = request("HoldSlot", "r1", HELD, Answer("FAILED_PRECONDITION", "SLOT_UNAVAILABLE"))
    found = checks.check_copies([raced])
    assert names(found) == ["copies_got_same_answer"]
    assert "SLOT_UNAVAILABLE" in found[0].detail
    other_state = request("HoldSlot", "r1", HELD, Answer("OK", "", "a1", "CONFIRMED", "s1"))
    assert names(checks.check_copies([other_state])) == ["copies_got_same_answer"]
    # A copy that gave up is not an answer.
    assert checks.check_copies([request("HoldSlot", "r1", HELD, None)]) == []


def test_unknown_and_internal_are_reported_even_when_a_retry_succeeded() -> None:
    retried = request("HoldSlot", "r1", HELD, attempts=["UNAVAILABLE", "INTERNAL"])
    assert names(checks.check_codes([retried], [])) == ["no_unknown_or_internal"]
    assert checks.check_codes([request("HoldSlot", "r1", HELD, attempts=["UNAVAILABLE"])], []) == []
    log = ConsumerLog("c", bad_messages=["UNKNOWN: Unexpected <class 'KeyError'>"])
    assert names(checks.check_codes([], [log])) == ["no_unknown_or_internal"]


# -- readers with tokens ---------------------------------------------------------------------------

# Appointment a1's chain in the final history: held at t=10, confirmed at
# t=20, cancelled at t=30 (created_us, the transaction's now()).
CHAIN = [
    EventRow("e1", "a1", "HELD", None, "HOLD", created_us=10),
    EventRow("e2", "a1", "CONFIRMED", "HOLD", "CONFIRMED", created_us=20),
    EventRow("e3", "a1", "CANCELLED", "CONFIRMED", "CANCELLED", created_us=30),
]
# The reader's ConfirmAppointment (request w2) produced e2.
PRODUCED = {"w2": [EventRef("e2", "CONFIRMED", "a1", "CONFIRMED")]}


def read_back(
    status: str,
    update_us: int | None,
    *,
    code: str = "OK",
    tokened: bool = True,
    token_issued: bool = True,
    attempts: list[str] | None = None,
) -> TokenRead:
    return TokenRead(
        "reader-0",
        "ConfirmAppointment",
        "w2",
        "a1",
        "CONFIRMED",
        0,
        1,
        "GetAppointment",
        tokened,
        token_issued,
        code,
        attempts or [code],
        [],
        status,
        update_us,
    )


def test_a_tokened_read_at_or_past_its_write_passes() -> None:
    reads = [read_back("CONFIRMED", 20), read_back("CANCELLED", 30)]
    found, stats = checks.check_token_reads(reads, PRODUCED, CHAIN)
    assert found == []
    assert stats.tokened_checked == 2


def test_a_tokened_read_older_than_its_write_is_reported() -> None:
    found, _ = checks.check_token_reads([read_back("HOLD", 10)], PRODUCED, CHAIN)
    assert names(found) == ["read_not_older_than_token"]
    assert "older than the write's own state 1" in found[0].detail


def test_a_tokened_read_that_misses_the_appointment_is_reported() -> None:
    missing = [read_back("", None, code="NOT_FOUND"), read_back("", None)]
    found, _ = checks.check_token_reads(missing, PRODUCED, CHAIN)
    assert names(found) == ["read_not_older_than_token"] * 2


def test_a_tokened_read_of_a_state_the_history_lacks_is_reported() -> None:
    # The right status, but not the change that made it (update_time differs).
    found, _ = checks.check_token_reads([read_back("CONFIRMED", 21)], PRODUCED, CHAIN)
    assert names(found) == ["read_not_older_than_token"]
    assert "does not have" in found[0].detail


def test_stale_reads_without_a_token_or_without_one_issued_are_only_counted() -> None:
    stale = [
        read_back("HOLD", 10, tokened=False),
        read_back("", None, code="NOT_FOUND", tokened=False),
        read_back("HOLD", 10, token_issued=False),
        # A read that gave up, and a write the final history lost, say nothing.
        read_back("", None, code=""),
    ]
    found, stats = checks.check_token_reads(stale, PRODUCED, CHAIN)
    assert found == []
    assert (stats.untokened_checked, stats.untokened_stale) == (2, 2)
    assert (stats.tokened_checked, stats.tokened_unchecked, stats.gave_up) == (0, 2, 1)
    lost, _ = checks.check_token_reads([read_back("HOLD", 10)], {}, CHAIN)
    assert lost == []


def test_a_read_answered_internal_is_reported() -> None:
    bad = read_back("CONFIRMED", 20, attempts=["INTERNAL", "OK"])
    assert names(checks.check_codes([], [], [bad])) == ["no_unknown_or_internal"]


# -- consumers -----------------------------------------------------------------------------------

TABLE = ["e1", "e2", "e3", "e4", "e5"]


def consumer(*ids: str) -> ConsumerLog:
    return ConsumerLog("c0", event_ids=list(ids))


def test_consumer_that_saw_the_table_passes() -> None:
    assert checks.check_consumer(consumer(*TABLE), TABLE) == []


def test_consumer_gap_is_reported() -> None:
    found = checks.check_consumer(consumer("e1", "e2", "e4", "e5"), TABLE)
    assert names(found) == ["consumer_sequence"]
    assert "gap" in found[0].detail and "e3" in found[0].detail


def test_consumer_duplicate_is_reported() -> None:
    found = checks.check_consumer(consumer("e1", "e2", "e3", "e3", "e4", "e5"), TABLE)
    assert names(found) == ["consumer_sequence"]
    assert "more than once" in found[0].detail


def test_consumer_reordering_is_reported() -> None:
    found = checks.check_consumer(consumer("e1", "e3", "e2", "e4", "e5"), TABLE)
    assert names(found) == ["consumer_sequence"]
    assert "reorder" in found[0].detail


def test_consumer_phantom_event_is_reported() -> None:
    found = checks.check_consumer(consumer(*TABLE, "e9"), TABLE)
    assert names(found) == ["consumer_sequence"] and "not in the table" in found[0].detail


def test_consumer_behind_is_reported_only_for_settled_events() -> None:
    behind = consumer("e1", "e2", "e3")
    assert names(checks.check_consumer(behind, TABLE)) == ["consumer_sequence"]
    # e4 and e5 committed after the consumers were given time to catch up.
    assert checks.check_consumer(behind, TABLE, settled={"e1", "e2", "e3"}) == []
    assert names(checks.check_consumer(behind, TABLE, settled={"e1", "e4"})) == [
        "consumer_sequence"
    ]


def test_api_must_agree_with_sql() -> None:
    assert (
        checks.check_api_agrees({"s1": "HOLD"}, {"s1": "HOLD"}, {"a1": "HOLD"}, {"a1": "HOLD"})
        == []
    )
    found = checks.check_api_agrees({"s1": "HOLD"}, {"s1": "AVAILABLE"}, {"a1": "HOLD"}, {})
    assert names(found) == ["api_agrees_with_sql"] * 2


# -- logs -------------------------------------------------------------------------------------

LOG = """\
2030-01-01 12:00:00,000 INFO booking.rpc: /booking.v1.AppointmentService/HoldSlot OK 2.0ms
2030-01-01 12:00:01,000 ERROR service.errors: unexpected error in /booking.v1.AppointmentService/HoldSlot
Traceback (most recent call last):
  File "x.py", line 1, in f
    raise KeyError("k")
KeyError: 'k'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "y.py", line 2, in g
RuntimeError: boom
2030-01-01 12:00:02,000 WARNING asyncpg.pool: Failed to restore the pool connection floor; retrying
Traceback (most recent call last):
  File "z.py", line 3, in h
ConnectionResetError: [Errno 104] Connection reset by peer
2030-01-01 12:00:03,000 INFO booking.rpc: /booking.v1.AppointmentService/HoldSlot OK 2.0ms
"""


def test_tracebacks_in_logs_are_found_and_attributed(tmp_path: Path) -> None:
    path = tmp_path / "replica-0.log"
    path.write_text(LOG)
    found = checks.find_tracebacks(path)
    assert [(t.logger, t.exception) for t in found] == [
        ("service.errors", "RuntimeError: boom"),
        ("asyncpg.pool", "ConnectionResetError: [Errno 104] Connection reset by peer"),
    ]
    violations, background = checks.check_logs([path])
    assert names(violations) == ["no_traceback_in_logs"]
    assert "RuntimeError: boom" in violations[0].detail
    assert [t.logger for t in background] == ["asyncpg.pool"]
    clean = tmp_path / "replica-1.log"
    clean.write_text(LOG.splitlines(keepends=True)[0])
    assert checks.check_logs([clean]) == ([], [])


def test_seats_up_to_capacity_are_fine_and_one_more_is_reported() -> None:
    three = SlotRow("s0", "sp1", "HOLD", NOW, NOW + timedelta(minutes=30), capacity=3)
    appts = [
        AppointmentRow("a0", "s0", "u1", "CONFIRMED", None, party_size=2),
        AppointmentRow("a1", "s0", "u2", "HOLD", NOW + timedelta(minutes=5)),
    ]
    assert checks.check_slots([three], appts, NOW) == []
    # A free seat left: the slot must read AVAILABLE.
    assert names(checks.check_slots([three], appts[:1], NOW)) == ["slot_status_matches_appointment"]
    over = [*appts, AppointmentRow("a2", "s0", "u3", "HOLD", NOW + timedelta(minutes=5))]
    assert names(checks.check_slots([three], over, NOW)) == ["no_slot_over_capacity"]


def test_live_appointments_inside_each_others_buffers_are_reported() -> None:
    a = SlotRow("x", "sp1", "HOLD", NOW, NOW + timedelta(minutes=30))
    b = SlotRow("y", "sp1", "HOLD", NOW + timedelta(minutes=30), NOW + timedelta(minutes=60))

    def buffered(ident: str, slot_id: str, user: str, start: int, end: int) -> AppointmentRow:
        return AppointmentRow(
            ident,
            slot_id,
            user,
            "HOLD",
            NOW + timedelta(minutes=5),
            specialist_id="sp1",
            buffer_start=NOW + timedelta(minutes=start),
            buffer_end=NOW + timedelta(minutes=end),
        )

    close = [buffered("a0", "x", "u1", 0, 45), buffered("a1", "y", "u2", 30, 60)]
    assert names(checks.check_slots([a, b], close, NOW)) == ["no_buffer_overlap"]
    apart = [buffered("a0", "x", "u1", 0, 30), buffered("a1", "y", "u2", 30, 60)]
    assert checks.check_slots([a, b], apart, NOW) == []


# -- no write on a node that was not the leader ---------------------------------------

# Timeline 3 ended at 0/5000000 when timeline 4 was promoted at 12:00:10.
HISTORY = [
    [2, 0x3000000, "no recovery target specified", "2030-01-01T11:00:00.000000+00:00", "node1"],
    [3, 0x5000000, "no recovery target specified", "2030-01-01T12:00:10.500000+00:00", "node2"],
]


def witness_text(*commits: tuple[int, str, str], timeline: int = 3, start: str = "4000000") -> str:
    """What rewind_witness.py writes: a header, then pg_waldump lines."""
    lines = ["# data /x/data", f"# timeline {timeline}", "# checkpoint 5001000", f"# from {start}"]
    for xid, lsn, at in commits:
        lines.append(
            f"rmgr: Transaction len (rec/tot):     34/    34, tx:  {xid:>9}, lsn: {lsn}, "
            f"prev 0/04FFFF00, desc: COMMIT {at} UTC"
        )
    lines.append("# pg_waldump: pg_waldump: error: error in WAL record at 0/5001000")
    return "\n".join(lines) + "\n"


def test_a_commit_on_a_lost_tail_after_the_promotion_is_a_write_on_a_non_leader() -> None:
    text = witness_text(
        (700, "0/04FFFFA0", "2030-01-01 12:00:00.000001"),  # before the switch point: kept
        (701, "0/05000000", "2030-01-01 12:00:01.000000"),  # lost, made by the leader in flight
        (702, "0/05000100", "2030-01-01 12:00:30.250000"),  # lost, made after the promotion
    )
    w = checks.parse_rewind_witness("node1", "rewind-1.txt", text)
    assert [c.xid for c in w.commits] == [700, 701, 702]
    violations, stats = checks.check_writes_on_leader(HISTORY, [w])
    assert names(violations) == ["writes_only_on_leader"]
    assert "xid 702" in violations[0].detail
    assert (stats.rewinds, stats.lost_in_flight, stats.after_promotion) == (1, 1, 1)


def test_a_tail_with_only_in_flight_commits_passes() -> None:
    text = witness_text(
        (700, "0/04FFFFA0", "2030-01-01 12:00:20"),  # kept by the new leader: any time is fine
        (701, "0/05000080", "2030-01-01 12:00:10.499999"),
    )
    w = checks.parse_rewind_witness("node1", "rewind-1.txt", text)
    violations, stats = checks.check_writes_on_leader(HISTORY, [w, w])
    assert violations == []
    assert stats.lost_in_flight == 1  # counted once across both copies


def test_a_witness_that_cannot_see_the_whole_tail_fails() -> None:
    late = checks.parse_rewind_witness("node1", "a", witness_text(start="5000800"))
    broken = checks.parse_rewind_witness("node1", "b", "# data /x\n# error OSError('gone')\n")
    violations, _ = checks.check_writes_on_leader(HISTORY, [late, broken])
    assert names(violations) == ["writes_only_on_leader"] * 2
    # A rewind off the timeline still current discarded nothing.
    current = checks.parse_rewind_witness("node0", "c", witness_text(timeline=4, start="9000000"))
    assert checks.check_writes_on_leader(HISTORY, [current])[0] == []


def tail(*records: tuple[str, int, str]) -> str:
    """The witness's dump of every record past the divergence point."""
    lines = [
        f"# tail: rmgr: {rmgr:<11} len (rec/tot):     54/    54, tx:  {xid:>9}, lsn: 0/05000100, "
        f"prev 0/05000000, desc: {desc}"
        for rmgr, xid, desc in records
    ]
    return "\n".join([*lines, "# tail-end 0/5000000"]) + "\n"


def test_only_a_transaction_on_catalogs_alone_is_the_nodes_own() -> None:
    after = "2030-01-01 12:00:30.000000"
    commits = witness_text(
        (801, "0/05000200", after),  # autoanalyze: pg_statistic and pg_class only
        (802, "0/05000300", after),  # a client's update of a table
        (803, "0/05000400", after),  # the service's sync barrier
    )
    records = tail(
        ("Heap", 801, "UPDATE off: 3, blkref #0: rel 1663/16386/2619 blk 4"),
        ("Heap", 801, "INPLACE off: 9, blkref #0: rel 1663/16386/1259 blk 1"),
        ("Heap", 802, "LOCK xmax: 802, off: 23, blkref #0: rel 1663/16386/1259 blk 2"),
        ("Heap", 802, "HOT_UPDATE old_xmax: 802, blkref #0: rel 1663/16386/17224 blk 1"),
        ("LogicalMessage", 803, 'MESSAGE transactional, prefix "booking_sync_barrier"'),
    )
    w = checks.parse_rewind_witness("node1", "r", commits + records)
    violations, stats = checks.check_writes_on_leader(HISTORY, [w])
    assert sorted(v.detail.split()[3] for v in violations) == ["802", "803"]
    assert (stats.after_promotion, stats.maintenance_after_promotion) == (2, 1)
    # Without the whole tail nothing is taken for the node's own.
    cut = checks.parse_rewind_witness("node1", "r", commits + records.replace("# tail-end", "#"))
    assert len(checks.check_writes_on_leader(HISTORY, [cut])[0]) == 3


def test_a_transaction_begun_before_the_promotion_and_committed_on_resuming_is_counted_apart() -> (
    None
):
    # xid 901 took its xid before 902, which aborted before the promotion:
    # it had begun writing then, and its commit record, stamped after, was
    # written when the node resumed. xid 903 is not proven so: a write on a
    # node that was no longer the leader.
    before, after = "2030-01-01 12:00:05.000000", "2030-01-01 12:00:30.000000"
    commits = witness_text(
        (900, "0/05000100", before),  # the leader's own, in flight
        (901, "0/05000400", after),
        (903, "0/05000500", after),
    )
    records = tail(
        ("LogicalMessage", 901, 'MESSAGE transactional, prefix "booking_sync_barrier"'),
        ("Transaction", 902, f"ABORT {before} UTC"),
        ("LogicalMessage", 903, 'MESSAGE transactional, prefix "booking_sync_barrier"'),
    )
    w = checks.parse_rewind_witness("node1", "r", commits + records)
    violations, stats = checks.check_writes_on_leader(HISTORY, [w])
    assert [v.detail.split()[3] for v in violations] == ["903"]
    assert (stats.lost_in_flight, stats.frozen_mid_commit, stats.after_promotion) == (1, 1, 1)
    assert w.started_before(datetime(2030, 1, 1, 12, 0, 10, 500000, tzinfo=UTC)) == 903
    # Without 902's abort only 900 is proven begun before: 901 is a write.
    bare = checks.parse_rewind_witness("node1", "r", commits + records.replace("ABORT", "X"))
    assert len(checks.check_writes_on_leader(HISTORY, [bare])[0]) == 2


def test_autovacuum_truncating_a_table_is_the_nodes_own() -> None:
    after = "2030-01-01 12:00:30.000000"
    commits = witness_text((811, "0/05000200", after), (812, "0/05000300", after))
    records = tail(
        ("Standby", 811, "LOCK xid 811 db 16386 rel 17187 "),
        ("XLOG", 811, "FPI , blkref #0: rel 1663/16386/17187 fork fsm blk 2 FPW"),
        ("XLOG", 811, "FPI , blkref #0: rel 1663/16386/17187 fork vm blk 0 FPW"),
        ("Storage", 811, "TRUNCATE base/16386/17187 to 1 blocks flags 7"),
        ("Heap", 811, "INPLACE off: 2; blkref #0: rel 1663/16386/1259 blk 3"),
        # A page image of a table's own pages is no vacuum's: a client's.
        ("XLOG", 812, "FPI , blkref #0: rel 1663/16386/17187 blk 0 FPW"),
    )
    w = checks.parse_rewind_witness("node1", "r", commits + records)
    violations, stats = checks.check_writes_on_leader(HISTORY, [w])
    assert [v.detail.split()[3] for v in violations] == ["812"]
    assert stats.maintenance_after_promotion == 1


def test_autovacuum_truncating_a_table_as_a_resumed_node_showed_it_is_the_nodes_own() -> None:
    """As a resumed node's witness showed it (a 180 s cluster run): an xid,
    its lock, full-page images of a user table's free space and visibility
    maps, the truncation, pg_class in place. No client writes so."""
    after = "2030-01-01 12:00:30.000000"
    commits = witness_text((1770, "0/05000200", after), (1771, "0/05000300", after))
    records = tail(
        ("Standby", 1770, "LOCK xid 1770 db 16386 rel 17250 "),
        ("XLOG", 1770, "FPI , blkref #0: rel 1663/16386/17250 fork fsm blk 2 FPW"),
        ("XLOG", 1770, "FPI , blkref #0: rel 1663/16386/17250 fork vm blk 0 FPW"),
        ("Storage", 1770, "TRUNCATE base/16386/17250 to 8 blocks flags 7"),
        ("Heap", 1770, "INPLACE off: 27; blkref #0: rel 1663/16386/1259 blk 6"),
        # A client's update whose page was imaged first is still a client's.
        ("XLOG", 1771, "FPI_FOR_HINT , blkref #0: rel 1663/16386/17224 blk 1 FPW"),
        ("Heap", 1771, "HOT_UPDATE old_xmax: 1771, blkref #0: rel 1663/16386/17224 blk 1"),
    )
    w = checks.parse_rewind_witness("node0", "r", commits + records)
    violations, stats = checks.check_writes_on_leader(HISTORY, [w])
    assert [v.detail.split()[3] for v in violations] == ["1771"]
    assert (stats.after_promotion, stats.maintenance_after_promotion) == (1, 1)
