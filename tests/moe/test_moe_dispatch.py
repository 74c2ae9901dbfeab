"""Capacity and dropless dispatch against plain-Python references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.moe.dispatch import (
    capacity_dispatch,
    expert_capacity,
    scatter_gates,
    sort_by_expert,
    tokens_per_expert,
    unsort_and_combine,
)


def _random_routing(seed, t, e, k, p_inactive=0.0):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    gates = rng.random((t, k)).astype(np.float32)
    gates /= gates.sum(-1, keepdims=True)
    active = rng.random((t, k)) >= p_inactive
    active[:, 0] = True
    return idx, gates, active


def _loop_reference(idx, gates, active, e, c):
    """GShard dispatch written as the obvious loops: choices in order k = 0..K-1, tokens in order."""
    t, k = idx.shape
    dispatch = np.zeros((t, e, c), np.float32)
    combine = np.zeros((t, e, c), np.float32)
    fill = np.zeros(e, int)
    dropped = 0
    for j in range(k):
        for i in range(t):
            if not active[i, j]:
                continue
            ex = idx[i, j]
            if fill[ex] < c:
                dispatch[i, ex, fill[ex]] = 1
                combine[i, ex, fill[ex]] = gates[i, j]
            else:
                dropped += 1
            fill[ex] += 1
    return dispatch, combine, dropped


@pytest.mark.parametrize("t,e,k,c,p_inactive", [(16, 4, 2, 3, 0.0), (33, 8, 3, 2, 0.3), (8, 2, 1, 8, 0.0)])
def test_capacity_dispatch_matches_loop_reference(t, e, k, c, p_inactive):
    idx, gates, active = _random_routing(t * 7 + e, t, e, k, p_inactive)
    plan = capacity_dispatch(jnp.asarray(idx), jnp.asarray(gates), jnp.asarray(active), e, c)
    d_ref, c_ref, dropped_ref = _loop_reference(idx, gates, active, e, c)
    np.testing.assert_array_equal(np.asarray(plan.dispatch), d_ref)
    np.testing.assert_allclose(np.asarray(plan.combine), c_ref, rtol=1e-6)
    assert int(plan.dropped) == dropped_ref
    # invariants: a slot holds at most one token, an expert at most C, combine only where dispatched
    d = np.asarray(plan.dispatch)
    assert d.sum(axis=0).max() <= 1
    assert (d.sum(axis=(0, 2)) <= c).all()
    assert np.all((np.asarray(plan.combine) > 0) <= (d > 0))
    assert int(np.asarray(plan.kept).sum()) + dropped_ref == int(active.sum())


def test_first_choices_have_priority_over_second_choices():
    # every token's second choice is expert 0, and token 3's first choice is expert 0 too
    idx = jnp.array([[1, 0], [2, 0], [3, 0], [0, 1]], jnp.int32)
    gates = jnp.full((4, 2), 0.5)
    plan = capacity_dispatch(idx, gates, jnp.ones((4, 2), bool), 4, 1)
    kept = np.asarray(plan.kept)
    assert kept[3, 0], "a first choice must not lose its slot to an earlier token's second choice"
    assert not kept[:, 1].any()  # experts 0 and 1 are full after the first choices
    assert int(plan.dropped) == 4


def test_capacity_dispatch_jits_with_static_shapes():
    idx, gates, active = _random_routing(0, 12, 4, 2)
    f = jax.jit(capacity_dispatch, static_argnums=(3, 4))
    plan = f(jnp.asarray(idx), jnp.asarray(gates), jnp.asarray(active), 4, 5)
    assert plan.dispatch.shape == (12, 4, 5)


def test_expert_capacity_formula_and_errors():
    assert expert_capacity(100, 8, 2, 1.0) == 25
    assert expert_capacity(100, 8, 2, 1.25) == 32  # ceil(31.25)
    assert expert_capacity(10, 8, 2, 100.0) == 10  # never above T
    assert expert_capacity(1, 8, 2, 1.0, min_capacity=4) == 1
    assert expert_capacity(64, 8, 2, 0.01, min_capacity=4) == 4
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 4, 2, 0.0)
    with pytest.raises(ValueError, match="min_capacity"):
        expert_capacity(10, 4, 2, 1.0, min_capacity=0)


def test_sorted_dispatch_roundtrip_equals_weighted_sum():
    t, e, k, h = 10, 4, 2, 3
    idx, gates, active = _random_routing(3, t, e, k, p_inactive=0.4)
    x = np.random.default_rng(1).standard_normal((t, h)).astype(np.float32)
    sd = sort_by_expert(jnp.asarray(idx), jnp.asarray(active), e)
    keys = np.where(active, idx, e).reshape(-1)[np.asarray(sd.order)]
    assert (np.diff(keys) >= 0).all(), "rows must be sorted by expert"
    np.testing.assert_array_equal(np.asarray(sd.group_sizes), np.bincount(idx[active], minlength=e))
    # a fake "expert" that scales its rows by (expert + 1)
    sorted_expert = np.repeat(np.arange(e), np.asarray(sd.group_sizes))
    sorted_expert = np.concatenate([sorted_expert, np.zeros(t * k - len(sorted_expert), int)])
    y_sorted = x[np.asarray(sd.token)] * (sorted_expert[:, None] + 1)
    y = unsort_and_combine(jnp.asarray(y_sorted), sd, jnp.asarray(gates), jnp.asarray(active))
    ref = np.einsum("tk,tkh->th", np.where(active, gates, 0), x[:, None, :] * (idx[..., None] + 1))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)


def test_scatter_gates_and_tokens_per_expert():
    idx = jnp.array([[0, 2], [2, 1]], jnp.int32)
    gates = jnp.array([[0.7, 0.3], [0.6, 0.4]])
    active = jnp.array([[True, True], [True, False]])
    np.testing.assert_allclose(np.asarray(scatter_gates(idx, gates, active, 3)), [[0.7, 0, 0.3], [0, 0, 0.6]])
    np.testing.assert_array_equal(np.asarray(tokens_per_expert(idx, active, 3)), [1, 0, 2])
