"""Token-true weights: the WF2Q rule's bound, the skew it fixes, and bad lengths refused.

Plan-level tests, no I/O; the dataset side (sidecars, layouts, resume) is in
tests/test_tokens_dataset.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixstream.plan import MixturePlan, PlanState
from mixstream.tokens import (
    TokenLengths,
    allocate_tokens,
    encode_sidecar,
    load_sidecar,
    sidecar_entry,
)
from mixstream.weights import WeightSchedule

SIZES = (400, 250)


def variable_lengths(seed: int = 0) -> TokenLengths:
    """Group A: 10-20 tokens a sample; group B: 100-300."""
    rng = np.random.default_rng(seed)
    a = rng.integers(10, 21, size=SIZES[0])
    b = rng.integers(100, 301, size=SIZES[1])
    return TokenLengths.build([a, b], ["a", "b"], SIZES)


def schedule_of(changes: dict[int, list[float]]) -> WeightSchedule:
    schedule = WeightSchedule()
    for batch, w in sorted(changes.items()):
        schedule.set(batch, np.asarray(w, dtype=np.float64) / sum(w))
    return schedule


def run_plan(plan: MixturePlan, schedule: WeightSchedule, batches: int) -> list[PlanState]:
    state, out = plan.initial_state(), []
    for _ in range(batches):
        _, state = plan.step(state, schedule)
        out.append(state)
    return out


def realised_tokens(plan: MixturePlan, states: list[PlanState]) -> np.ndarray:
    """Tokens per group after each batch, recounted from the samples drawn (not the state)."""
    assert plan.lengths is not None
    out, have = [], np.zeros(plan.num_groups, dtype=np.int64)
    previous = plan.initial_state().counts
    for state in states:
        for g in range(plan.num_groups):
            ids = plan.group_positions(g, previous[g], state.counts[g] - previous[g])
            have[g] += sum(plan.lengths.lookup(g, ids - plan.offsets[g]))
        previous = state.counts
        out.append(have.copy())
    return np.array(out)


def fixed_bound(lengths: TokenLengths, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ahead, behind) limits of R_g - w_g D for fixed weights (mixstream.tokens)."""
    longest = np.array(lengths.longest, dtype=np.float64)
    overall = longest[w > 0].max()
    return longest, longest + w * overall


@pytest.mark.parametrize("batch_size", [1, 8, 64])
@pytest.mark.parametrize("w", [[0.5, 0.5], [0.9, 0.1], [0.03, 0.97]])
def test_token_share_tracks_fixed_weights_within_the_bound_at_every_batch(
    batch_size: int, w: list[float]
) -> None:
    lengths = variable_lengths()
    plan = MixturePlan(SIZES, batch_size, seed=5, lengths=lengths)
    assert plan.counts_tokens
    weights = np.asarray(w)
    states = run_plan(plan, schedule_of({0: w}), 300)
    tokens = realised_tokens(plan, states)
    assert (tokens == np.array([s.tokens for s in states])).all(), "state tokens are the drawn"
    ahead, behind = fixed_bound(lengths, weights)
    delivered = tokens.sum(axis=1, keepdims=True)
    gap = tokens - weights * delivered
    assert (gap < ahead).all() and (gap > -behind).all()
    targets = np.array([s.targets for s in states])
    assert np.allclose(targets, weights * delivered, rtol=1e-9, atol=1e-6)
    assert all(sum(s.counts) == (i + 1) * batch_size for i, s in enumerate(states))


def test_samples_mode_on_the_same_data_shows_the_skew_tokens_mode_fixes() -> None:
    """Equal sample weights give group B ~13x A's tokens (mean 200 vs 15 tokens a sample)."""
    lengths = variable_lengths()
    w = [0.5, 0.5]
    per_unit = {}
    for unit, lens in (("samples", None), ("tokens", lengths)):
        plan = MixturePlan(SIZES, 16, seed=5, lengths=lens)
        states = run_plan(plan, schedule_of({0: w}), 200)
        counts = np.array(states[-1].counts)
        ids = [plan.group_positions(g, 0, int(counts[g])) for g in range(2)]
        tokens = [sum(lengths.lookup(g, ids[g] - plan.offsets[g])) for g in range(2)]
        per_unit[unit] = tokens[0] / sum(tokens)
    assert per_unit["samples"] < 0.1  # what sample weights deliver in tokens
    assert abs(per_unit["tokens"] - 0.5) < 0.005  # the bound: 170 of ~90,000 tokens


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    m=st.integers(2, 5),
    batch_size=st.integers(1, 24),
    batches=st.integers(1, 30),
    change=st.booleans(),
)
def test_rule_bound_for_random_lengths_fixed_and_changing_weights(
    data: st.DataObject, m: int, batch_size: int, batches: int, change: bool
) -> None:
    """Fixed weights: within the stated bound. Changing weights (no online rule keeps the
    bound): within the empirical one, |R_g - T_g| < Lmax_g + Lmax."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    low = rng.integers(1, 200, size=m)
    seqs = [rng.integers(low[g], low[g] + rng.integers(1, 400), size=50) for g in range(m)]
    longest = np.array([s.max() for s in seqs], dtype=np.float64)
    vec = st.lists(st.floats(0, 1), min_size=m, max_size=m).filter(lambda v: sum(v) > 1e-3)
    first = data.draw(vec)
    schedule = [first] * batches
    if change:
        schedule = data.draw(st.lists(vec, min_size=batches, max_size=batches))
    targets, tokens = np.zeros(m), np.zeros(m, dtype=np.int64)
    cursors = np.zeros(m, dtype=np.int64)
    for raw in schedule:
        w = np.asarray(raw) / sum(raw)

        def next_length(g: int, k: int, w: np.ndarray = w, at: np.ndarray = cursors) -> int:
            assert w[g] > 0, "asked for a group with weight 0"
            return int(seqs[g][(at[g] + k) % 50])

        n, t, r = allocate_tokens(targets, tokens, w, batch_size, next_length)
        assert sum(n) == batch_size and all(k == 0 for k, x in zip(n, w, strict=True) if x == 0)
        cursors += n
        targets, tokens = np.asarray(t), np.asarray(r)
        if change:
            assert (np.abs(tokens - targets) < longest + longest.max()).all()
        else:
            pos = w > 0
            gap = (tokens - targets)[pos]
            assert (gap < longest[pos]).all()
            assert (gap > -(longest[pos] + w[pos] * longest[pos].max())).all()


def literal_rule(
    targets: np.ndarray, tokens: np.ndarray, w: np.ndarray, batch_size: int, next_length
) -> tuple[list[int], list[float], list[int]]:
    """The rule as mixstream.tokens states it, scanning every group at every slot."""
    targets, w = targets.tolist(), w.tolist()  # Python floats, as the module computes
    active = [g for g in range(len(w)) if w[g] > 0]
    r, taken, done = [int(x) for x in tokens], [0] * len(w), 0
    for _ in range(batch_size):
        rank = []
        for g in active:
            start = (r[g] - targets[g]) / w[g]
            finish = (r[g] + next_length(g, taken[g]) - targets[g]) / w[g]
            rank.append((start > done, finish, g))  # eligible first, then earliest finish
        g = min(rank)[2]
        length = next_length(g, taken[g])
        r[g], done, taken[g] = r[g] + length, done + length, taken[g] + 1
    new = [t + w[g] * done if w[g] > 0 else t for g, t in enumerate(targets)]
    return taken, new, r


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 7),
    batch_size=st.integers(1, 40),
    batches=st.integers(1, 12),
)
def test_the_heaps_pick_what_the_literal_rule_picks(
    data: st.DataObject, m: int, batch_size: int, batches: int
) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    seqs = [rng.integers(1, data.draw(st.integers(2, 500)), size=64) for _ in range(m)]
    vec = st.lists(st.floats(0, 1), min_size=m, max_size=m).filter(lambda v: sum(v) > 1e-3)
    targets, tokens = np.zeros(m), np.zeros(m, dtype=np.int64)
    cursors = np.zeros(m, dtype=np.int64)
    for raw in data.draw(st.lists(vec, min_size=batches, max_size=batches)):
        w = np.asarray(raw) / sum(raw)

        def next_length(g: int, k: int, at: np.ndarray = cursors) -> int:
            return int(seqs[g][(at[g] + k) % 64])

        got = allocate_tokens(targets, tokens, w, batch_size, next_length)
        assert got == literal_rule(targets, tokens, w, batch_size, next_length)
        cursors += got[0]
        targets, tokens = np.asarray(got[1]), np.asarray(got[2])


def test_weight_changes_stay_within_the_empirical_bound_in_a_plan() -> None:
    lengths = variable_lengths(1)
    plan = MixturePlan(SIZES, 8, seed=2, lengths=lengths)
    changes = {0: [0.5, 0.5], 40: [0.95, 0.05], 90: [0.0, 1.0], 120: [1.0, 0.0], 150: [0.2, 0.8]}
    states = run_plan(plan, schedule_of(changes), 220)
    tokens = realised_tokens(plan, states)
    targets = np.array([s.targets for s in states])
    longest = np.array(lengths.longest)
    assert (np.abs(tokens - targets) < longest + longest.max()).all()
    # Weight 0 is never drawn: batches 90+lag.. take only B until the change at 120.
    counts = np.array([s.counts for s in states])
    assert (np.diff(counts[89:120, 0]) == 0).all() and (np.diff(counts[119:150, 1]) == 0).all()
    # Fixed weights again from 150: the carried gap closes to the fixed-weight bound.
    w = np.array([0.2, 0.8])
    ahead, behind = fixed_bound(lengths, w)
    since = tokens[-1] - tokens[160]
    assert np.all(np.abs(tokens[-1] - targets[-1]) < np.maximum(ahead, behind) + 1)
    assert abs(since[0] / since.sum() - 0.2) < 0.02


def test_equal_lengths_everywhere_are_exactly_the_samples_plan() -> None:
    """Packed corpora: a token share is a sample share, and the sequence is today's."""
    schedule = schedule_of({0: [0.7, 0.3], 5: [0.1, 0.9]})
    samples = MixturePlan(SIZES, 8, seed=4)
    for lengths in (TokenLengths([32, 32]), TokenLengths([np.full(400, 7), 7])):
        tokens = MixturePlan(SIZES, 8, seed=4, lengths=lengths)
        assert not tokens.counts_tokens
        a, b = samples.initial_state(), tokens.initial_state()
        for _ in range(20):
            da, a = samples.step(a, schedule)
            db, b = tokens.step(b, schedule)
            assert da == db and a == b
            assert samples.layout(da, 0, 8)[0].tolist() == tokens.layout(db, 0, 8)[0].tolist()
        uniform = lengths.uniform
        assert tokens.tokens_of(b) == tuple(c * uniform for c in b.counts)
    # Groups with different constant lengths are not uniform: the token rule applies.
    assert MixturePlan(SIZES, 8, seed=4, lengths=TokenLengths([16, 64])).counts_tokens


def test_the_plan_is_a_pure_function_of_its_inputs() -> None:
    """Two plans (two processes' worth) agree batch by batch, layouts included."""
    schedule = schedule_of({0: [0.4, 0.6], 7: [0.8, 0.2]})
    plans = [MixturePlan(SIZES, 12, seed=9, lengths=variable_lengths()) for _ in range(2)]
    states = [p.initial_state() for p in plans]
    for _ in range(30):
        draws = []
        for i, p in enumerate(plans):
            draw, states[i] = p.step(states[i], schedule)
            draws.append((draw, p.layout(draw, 0, 12)[0].tolist()))
        assert draws[0] == draws[1]
    # From a state saved mid-run (as JSON would carry it), the continuation is the same.
    saved = PlanState.from_dict(states[0].to_dict())
    assert saved == states[0]
    fresh = MixturePlan(SIZES, 12, seed=9, lengths=variable_lengths())
    assert fresh.step(saved, schedule) == plans[0].step(states[0], schedule)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([np.arange(1, 401), np.arange(1, 250)], "249 token lengths .* of 250 samples"),
        ([np.arange(1, 401), np.zeros(250, dtype=np.int64)], "sample 0 has token length 0"),
        ([np.arange(1, 401), -np.ones(250, dtype=np.int64)], "token length -1"),
        ([np.arange(1, 401), np.ones(250) * 3.5], "must be integers, got dtype float64"),
        ([np.arange(1, 401), 0], r"token_lengths\['b'\].*length 0"),
        ([np.arange(1, 401)], "1 entries for 2 groups"),
        ({"a": np.arange(1, 401)}, r"no lengths for groups \['b'\]"),
    ],
)
def test_bad_lengths_are_refused_naming_the_group(values: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenLengths.build(values, ["a", "b"], SIZES)  # type: ignore[arg-type]


def test_sidecar_round_trip_and_tampering() -> None:
    lengths = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    data = encode_sidecar(lengths)
    entry = sidecar_entry(data)
    assert load_sidecar(data, entry, 5, "x/lengths.npy").tolist() == lengths.tolist()
    with pytest.raises(ValueError, match="truncated or was replaced"):
        load_sidecar(data[:-1], entry, 5, "x/lengths.npy")
    flipped = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(ValueError, match=r"has xxh64 .* corrupt"):
        load_sidecar(flipped, entry, 5, "x/lengths.npy")
    with pytest.raises(ValueError, match=r"5 token lengths .* of 6 samples"):
        load_sidecar(data, entry, 6, "x/lengths.npy")
    floats = encode_sidecar(lengths).replace(b"<u4", b"<f4")
    with pytest.raises(ValueError, match="must be integers"):
        load_sidecar(floats, sidecar_entry(floats), 5, "x/lengths.npy")
    junk = b"not an npy file"
    with pytest.raises(ValueError, match=r"not a \.npy array"):
        load_sidecar(junk, sidecar_entry(junk), 5, "x/lengths.npy")
