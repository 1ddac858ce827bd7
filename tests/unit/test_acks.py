"""at_least_once: offsets are committed only behind the acknowledged contiguous prefix."""

from __future__ import annotations

import random

import pytest

from inference_service.pipeline.acks import AckLedger, Settlement

P0 = ("tasks", 0)
P1 = ("tasks", 1)


def test_only_the_contiguous_acknowledged_prefix_is_committed() -> None:
    ledger = AckLedger()
    for offset in range(5):
        gen = ledger.sent(P0, offset)
    for offset in (0, 1, 3, 4):  # 2 not yet acknowledged
        ledger.delivered(P0, offset, ok=True, generation=gen)
    assert ledger.settle().commit == {P0: 2}
    ledger.committed({P0: 2})
    assert ledger.settle().commit == {}
    ledger.delivered(P0, 2, ok=True, generation=gen)
    assert ledger.settle().commit == {P0: 5}


def test_a_record_with_a_dead_letter_needs_both_acknowledgements() -> None:
    ledger = AckLedger()
    gen = ledger.sent(P0, 7, messages=2)  # error result + dead letter
    ledger.delivered(P0, 7, ok=True, generation=gen)
    assert ledger.settle().commit == {}
    ledger.delivered(P0, 7, ok=True, generation=gen)
    assert ledger.settle().commit == {P0: 8}


def test_a_refused_message_rewinds_its_partition_and_commits_what_came_before() -> None:
    ledger = AckLedger()
    for offset in range(4):
        g0 = ledger.sent(P0, offset)
        g1 = ledger.sent(P1, offset)
    for offset in range(4):
        ledger.delivered(P1, offset, ok=True, generation=g1)
    ledger.delivered(P0, 0, ok=True, generation=g0)
    ledger.delivered(P0, 2, ok=False, generation=g0)
    ledger.delivered(P0, 1, ok=True, generation=g0)
    settlement = ledger.settle()
    assert settlement.commit == {P0: 2, P1: 4}
    assert settlement.rewind == {P0: 2}
    ledger.delivered(P0, 3, ok=True, generation=g0)  # a late answer for a reset lane is ignored
    assert ledger.settle().rewind == {}


def test_a_late_report_from_before_a_rewind_does_not_count_for_the_offset_sent_again() -> None:
    ledger = AckLedger()
    g_old = ledger.sent(P0, 10)
    ledger.delivered(P0, 10, ok=False, generation=g_old)
    assert ledger.settle().rewind == {P0: 10}
    g_new = ledger.sent(P0, 10)  # consumed again after the rewind
    assert g_new != g_old
    ledger.delivered(P0, 10, ok=True, generation=g_old)  # the old attempt's retry succeeded late
    assert ledger.settle().commit == {}  # not counted for the new attempt
    ledger.delivered(P0, 10, ok=True, generation=g_new)
    assert ledger.settle().commit == {P0: 11}
    ledger.committed({P0: 11})
    assert ledger.idle


def test_settling_some_partitions_leaves_the_others_alone() -> None:
    ledger = AckLedger()
    g0, g1 = ledger.sent(P0, 0), ledger.sent(P1, 0)
    ledger.delivered(P0, 0, ok=True, generation=g0)
    ledger.delivered(P1, 0, ok=False, generation=g1)
    settlement = ledger.settle([P0])
    assert settlement == Settlement(commit={P0: 1}, rewind={})
    assert ledger.settle([P1]).rewind == {P1: 0}


def test_a_failed_commit_is_tried_again_and_forget_drops_a_partition() -> None:
    ledger = AckLedger()
    gen = ledger.sent(P0, 0)
    ledger.delivered(P0, 0, ok=True, generation=gen)
    assert ledger.settle().commit == {P0: 1}
    assert ledger.settle().commit == {P0: 1}  # not confirmed committed: offered again
    assert not ledger.idle
    ledger.forget([P0])
    assert ledger.settle().commit == {}
    assert ledger.idle


def test_offsets_only_grow() -> None:
    ledger = AckLedger()
    ledger.sent(P0, 5)
    with pytest.raises(ValueError, match="after 5"):
        ledger.sent(P0, 5)


@pytest.mark.parametrize("seed", range(10))
def test_random_acknowledgement_order_never_commits_past_a_gap(seed: int) -> None:
    rng = random.Random(seed)
    ledger = AckLedger()
    n = 50
    for offset in range(n):
        gen = ledger.sent(P0, offset)
    order = list(range(n))
    rng.shuffle(order)
    acked: set[int] = set()
    for offset in order:
        ledger.delivered(P0, offset, ok=True, generation=gen)
        acked.add(offset)
        commit = ledger.settle().commit.get(P0)
        if commit is not None:
            assert set(range(commit)) <= acked
            ledger.committed({P0: commit})
        gap = min(set(range(n)) - acked, default=n)
        assert commit is None or commit <= gap
    assert ledger.idle
