"""The supervisor's readiness rules: join on SERVING, leave on NOT_SERVING or death at once, on silence only after the threshold."""

from stack.supervisor import Readiness

A, B = ("gateway-1", 100), ("gateway-2", 200)


def test_a_replica_joins_on_its_first_serving_answer_and_not_before() -> None:
    readiness = Readiness()
    assert readiness.update({A: None, B: None}) == set()
    assert readiness.update({A: True, B: None}) == {A}


def test_a_live_replica_that_misses_probes_stays_until_the_threshold() -> None:
    readiness = Readiness(failure_threshold=3)
    readiness.update({A: True, B: True})
    assert readiness.update({A: None, B: True}) == {A, B}
    assert readiness.update({A: None, B: True}) == {A, B}
    assert readiness.update({A: None, B: True}) == {B}
    assert readiness.update({A: True, B: True}) == {A, B}


def test_an_answer_resets_the_count_of_misses() -> None:
    readiness = Readiness(failure_threshold=2)
    readiness.update({A: True})
    readiness.update({A: None})
    readiness.update({A: True})
    assert readiness.update({A: None}) == {A}
    assert readiness.update({A: None}) == set()


def test_not_serving_and_a_dead_process_leave_at_once() -> None:
    readiness = Readiness()
    readiness.update({A: True, B: True})
    assert readiness.update({A: False, B: True}) == {B}  # draining after SIGTERM
    assert readiness.update({A: False}) == set()  # B's process is gone


def test_a_restarted_replica_under_the_same_name_is_new() -> None:
    readiness = Readiness()
    readiness.update({A: True})
    restarted = (A[0], 101)
    assert readiness.update({restarted: None}) == set()  # not ready until the new process answers
    assert readiness.update({restarted: True}) == {restarted}
