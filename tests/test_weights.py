"""Weight validation and the schedule's "from this batch on" semantics."""

from __future__ import annotations

import numpy as np
import pytest

from mixstream.weights import WeightSchedule, normalize_weights

GROUPS = ["code", "law", "web"]


def test_mapping_and_vector_normalize() -> None:
    np.testing.assert_allclose(normalize_weights({"code": 1, "law": 3}, GROUPS), [0.25, 0.75, 0])
    np.testing.assert_allclose(normalize_weights([2, 2, 4], GROUPS), [0.25, 0.25, 0.5])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1, 2], "got 2 weights for 3 groups"),
        ([1, -1, 1], "negative for law"),
        ([1, float("nan"), 1], "not finite for law"),
        ([1, float("inf"), 1], "not finite for law"),
        ([0, 0, 0], "all zero"),
        ({"math": 1.0}, "unknown group(s) 'math'"),
        (["a", "b", "c"], "must be numbers"),
    ],
)
def test_bad_weights_say_what_is_wrong(weights: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_weights(weights, GROUPS)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_schedule_later_decision_replaces_the_future() -> None:
    s = WeightSchedule()
    a, b, c = (np.full(3, x) for x in (1.0, 2.0, 3.0))
    s.set(0, a)
    s.set(10, b)
    s.set(20, c)
    assert (s.at(9) == a).all() and (s.at(10) == b).all() and (s.at(25) == c).all()
    s.set(15, a)  # supersedes the entry at 20
    assert [e for e, _ in s.entries] == [0, 10, 15]
    assert (s.at(25) == a).all()
    again = WeightSchedule.from_list(s.to_list())
    assert [e for e, _ in again.entries] == [0, 10, 15]
    with pytest.raises(ValueError):
        WeightSchedule([(5, a)]).set(1, b)


def test_average_weighs_each_batch_once() -> None:
    s = WeightSchedule()
    s.set(0, np.array([1.0, 0.0]))
    s.set(3, np.array([0.0, 1.0]))
    s.set(10, np.array([0.5, 0.5]))
    np.testing.assert_allclose(s.average(4), [0.75, 0.25])
    np.testing.assert_allclose(s.average(12), [4 / 12, 8 / 12])
    np.testing.assert_allclose(s.average(0), [1.0, 0.0])
