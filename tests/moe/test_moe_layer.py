"""PiKVMoE: sparse paths equal the dense reference, drops, statistics, LoRA, distillation, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pikv_jax.moe import PiKVMoE, create_moe_router
from pikv_jax.moe.dispatch import scatter_gates

H, E, K = 16, 8, 2


def layer(**kw):
    kw.setdefault("rank", 2)
    kw.setdefault("alpha", 4.0)
    m = PiKVMoE(H, E, K, intermediate_size=24, rngs=nnx.Rngs(0), **kw)
    if m.experts.lora_rank:  # give the adapters a non-zero B so the LoRA path is exercised
        for name in ("gate_proj", "up_proj", "down_proj"):
            v = getattr(m.experts, name + "_lora_b")
            v[...] = 0.2 * jax.random.normal(jax.random.key(hash(name) % 1000), v[...].shape)
    return m


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state).forward(x)


def run(m: PiKVMoE, x):
    """Compiled `m.forward(x)` -> (y, stats as host numbers); one compile per layer structure and shape."""
    y, aux = _forward(*nnx.split(m), x)
    return y, {k: np.asarray(v) for k, v in aux.stats.items()}


def x_tokens(seed=0, shape=(2, 12)):
    return jax.random.normal(jax.random.key(seed), shape + (H,))


def plain_numpy_moe(m: PiKVMoE, x):
    """Independent truth: loop over tokens and their chosen experts in numpy, LoRA included."""
    routing = m.router.route(x)
    idx, gates = np.asarray(routing.expert_idx), np.asarray(routing.gates)
    w = {k: np.asarray(v, np.float64) for k, v in m.experts.weights().items()}
    s = m.experts.lora_scale
    x2 = np.asarray(x, np.float64).reshape(-1, H)

    def proj(name, e, v):
        out = v @ w[name][e]
        if name + "_lora_a" in w:
            out = out + s * (v @ w[name + "_lora_a"][e]) @ w[name + "_lora_b"][e]
        return out

    y = np.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            g = proj("gate_proj", e, x2[t])
            hdn = g / (1 + np.exp(-g)) * proj("up_proj", e, x2[t])
            y[t] += gates[t, j] * proj("down_proj", e, hdn)
    return y.reshape(np.shape(x))


@pytest.mark.parametrize("router", ["base", "sinkhorn", "hierarchical"])
def test_capacity_path_without_drops_equals_dense_reference(router):
    m = layer(router=router, capacity_factor=float(E) / K)  # C = T: nothing can drop
    x = x_tokens(1)
    y, stats = run(m, x)
    assert stats["dropped"] == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(m.dense_reference(x)), atol=1e-5)
    if router == "base":
        np.testing.assert_allclose(np.asarray(y), plain_numpy_moe(m, x), atol=1e-5)


def test_dropless_ragged_path_equals_dense_reference_and_numpy():
    m = layer(dropless=True, shared_expert_size=8)
    x = x_tokens(2)
    y, s = run(m, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(m.dense_reference(x)), atol=1e-5)
    shared = np.asarray(m.shared_output(x.reshape(-1, H))).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y) - shared, plain_numpy_moe(m, x), atol=1e-5)
    assert s["dropped"] == 0 and (s["processed_per_expert"] == s["tokens_per_expert"]).all()


def test_dropless_with_inactive_choices_matches_dense_reference():
    m = layer(router="adaptive", dropless=True, router_kwargs=dict(min_threshold=0.2, max_threshold=0.6))
    x = x_tokens(3)
    routing = m.router.route(x)
    assert not np.asarray(routing.active).all()
    np.testing.assert_allclose(np.asarray(run(m, x)[0]), np.asarray(m.dense_reference(x)), atol=1e-5)


def test_dropped_tokens_lose_exactly_their_dropped_contributions():
    m = layer(capacity_factor=0.5)
    x = x_tokens(4) + 2.0 * m.router.gate.kernel[...][:, 0]  # skewed towards expert 0
    routing, plan = m.router.plan(x, capacity=m.capacity(24))
    assert int(plan.dropped) > 0
    y = m(x)
    # dense reference restricted to the assignments that were kept
    kept_w = scatter_gates(routing.expert_idx, jnp.where(plan.kept, routing.gates, 0.0), routing.active, E)
    all_out = m.experts.all_tokens(x.reshape(-1, H))
    ref = jnp.einsum("te,eth->th", kept_w, all_out).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)
    s = m.get_stats()
    assert s["dropped"] == int(plan.dropped)
    assert s["drop_rate"] == pytest.approx(int(plan.dropped) / (24 * K))
    assert s["overflowed_experts"] >= 1
    assert max(s["processed_per_expert"]) <= s["capacity"]


def test_grouped_capacity_equals_running_each_group_alone():
    x = x_tokens(5, (4, 8))
    grouped = layer(capacity_factor=1.0, num_groups=4)
    y = np.asarray(run(grouped, x)[0]).reshape(4, 8, H)
    single = layer(capacity_factor=1.0)
    for g in range(4):  # capacity is per group: each group alone reproduces its slice
        np.testing.assert_allclose(y[g], np.asarray(run(single, x[g])[0]), atol=1e-5)
    with pytest.raises(ValueError, match="num_groups=4 must divide the number of tokens T=6"):
        grouped(x_tokens(6, (1, 6)))


def test_stats_losses_and_entropy():
    m = layer(router="topk_balanced")
    assert m.get_stats() == {}
    m(x_tokens(7))
    s = m.get_stats()
    assert sum(s["expert_load"]) == pytest.approx(1.0)
    assert sum(s["tokens_per_expert"]) == 24 * K
    assert 0 < s["router_entropy"] <= np.log(E) + 1e-6
    for name in ("aux_load_balance", "aux_z_loss", "aux_entropy_balance", "aux_variance_balance", "aux_gini_balance"):
        assert np.isfinite(s[name])
    assert s["aux_loss"] == pytest.approx(s["router_aux_loss"])


def test_stats_recorded_under_nnx_jit_and_pure_forward_under_jax_jit():
    m = layer()
    x = x_tokens(8)

    @nnx.jit
    def f(m, x):
        return m(x)

    y = f(m, x)
    assert m.get_stats()["num_tokens"] == 24
    graphdef, state = nnx.split(m)
    y2, aux = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))(state, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y2), atol=1e-6)
    assert aux.loss.shape == ()
    y3 = jax.jit(lambda x: m(x))(x)  # closed over by plain jit: pure, records nothing, no error
    np.testing.assert_allclose(np.asarray(y3), np.asarray(y), atol=1e-6)


def test_lora_adapters_start_neutral_and_train():
    plain = PiKVMoE(H, E, K, rank=0, intermediate_size=24, rngs=nnx.Rngs(0), capacity_factor=4.0)
    fresh = PiKVMoE(H, E, K, rank=3, alpha=6.0, intermediate_size=24, rngs=nnx.Rngs(0), capacity_factor=4.0)
    assert fresh.experts.lora_scale == 2.0
    for name in ("gate_proj", "up_proj", "down_proj"):  # same base weights, B = 0
        getattr(plain.experts, name)[...] = getattr(fresh.experts, name)[...]
    plain.router.gate.kernel[...] = fresh.router.gate.kernel[...]
    x = x_tokens(9)
    np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(plain(x)), atol=1e-6)
    assert not any("lora" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(plain)))
    graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)

    def loss(params):
        y, aux = nnx.merge(graphdef, params, rest, copy=True).forward(x)
        return jnp.mean(jnp.square(y - 1.0)) + aux.loss

    g = jax.grad(loss)(params)
    assert float(jnp.abs(g["experts"]["down_proj_lora_b"][...]).sum()) > 0
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(g))


def test_distillation_loss_is_mse_to_projected_teacher():
    m = layer(use_distillation=True, teacher_hidden_size=10)
    x = x_tokens(10)
    teacher = jax.random.normal(jax.random.key(11), (2, 12, 10))
    y, aux = m.forward(x, teacher_hidden=teacher)
    target = np.asarray(teacher).reshape(-1, 10) @ np.asarray(m.teacher_proj.kernel[...])
    expected = np.mean((np.asarray(y).reshape(-1, H) - target) ** 2)
    assert float(aux.stats["distill_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(aux.loss) == pytest.approx(float(aux.stats["router_aux_loss"]) + expected, rel=1e-5)
    # the guide's default teacher width is 2 * hidden_size; a non-positive width is refused
    assert PiKVMoE(H, E, K, use_distillation=True).teacher_proj.kernel.shape == (2 * H, H)
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        PiKVMoE(H, E, K, use_distillation=True, teacher_hidden_size=0)
    with pytest.raises(ValueError, match="use_distillation=False"):
        layer().forward(x, teacher_hidden=teacher)


def test_layer_errors_are_clear():
    with pytest.raises(ValueError, match="top_k=9 is larger than num_experts=8"):
        PiKVMoE(H, E, 9)
    with pytest.raises(ValueError, match="router was built for"):
        PiKVMoE(H, E, K, router=create_moe_router("base", H, 4, 2))
    with pytest.raises(ValueError, match="rank must be >= 0"):
        PiKVMoE(H, E, K, rank=-1)
    with pytest.raises(ValueError, match=r"hidden_size=16"):
        layer()(jnp.zeros((2, 5)))
