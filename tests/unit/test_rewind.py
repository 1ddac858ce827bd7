"""Where partitions resume after a failed exactly_once transaction (pure logic)."""

from __future__ import annotations

from inference_service.pipeline import rewind_positions

P0 = ("inference_tasks", 0)
P1 = ("inference_tasks", 1)
P2 = ("inference_tasks", 2)


def test_an_aborted_transaction_resumes_at_its_first_record() -> None:
    # the group's committed offsets are still where the failed cycle began
    assert rewind_positions({P0: 40, P1: 7}, {P0: 40, P1: 7}) == {P0: 40, P1: 7}


def test_a_transaction_that_committed_after_all_is_not_repeated() -> None:
    # the broker took the commit although the client saw a failure: resume after it
    assert rewind_positions({P0: 40, P1: 7}, {P0: 52, P1: 9}) == {P0: 52, P1: 9}


def test_partitions_the_group_has_no_offset_for_resume_at_the_cycle() -> None:
    assert rewind_positions({P0: 40, P1: 7, P2: 0}, {P0: None, P1: 9, P2: None}) == {
        P0: 40,
        P1: 9,
        P2: 0,
    }


def test_partitions_whose_offset_could_not_be_read_do_not_move() -> None:
    # never the cycle's first record: the failed cycle may have committed after all
    assert rewind_positions({P0: 40, P1: 7}, {P1: 9}) == {P1: 9}
    assert rewind_positions({P0: 40}, {}) == {}


def test_only_the_failed_cycle_s_partitions_move() -> None:
    assert rewind_positions({P0: 40}, {P0: 41, P1: 100}) == {P0: 41}
