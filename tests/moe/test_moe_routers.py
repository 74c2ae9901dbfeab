"""Every router: output contracts, differentiable auxiliary losses, eval determinism, seeded noise,
router-specific behaviour, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pikv_jax.moe import routers as R
from pikv_jax.moe.routers import ROUTERS, create_moe_router

H, E, K = 16, 8, 2
EXTRA = {"flex": dict(modality_dims={"image": 6, "genomic": 3})}


def make(kind, **kw):
    return create_moe_router(kind, H, E, K, **{**EXTRA.get(kind, {}), **kw})


def tokens(seed=0, shape=(2, 12)):
    return jax.random.normal(jax.random.key(seed), shape + (H,))


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_router_contracts_gradients_and_determinism(kind):
    """One compiled forward and one compiled gradient per router (keeps the suite fast)."""
    router = make(kind)
    x = tokens()
    t = 24
    cap = router.capacity(t)
    graphdef, params, rest = nnx.split(router, nnx.Param, ...)

    @jax.jit
    def forward(params, rest, x):
        r = nnx.merge(graphdef, params, rest)
        dispatch, combine, probs, aux = r(x)
        routing, roomy = r.plan(x, capacity=t)
        return dispatch, combine, probs, aux, routing.expert_idx, roomy.combine, roomy.dropped

    out = forward(params, rest, x)
    again = forward(params, rest, x)
    for u, v in zip(out, again):  # eval is deterministic
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    dispatch, combine, probs, aux, idx, roomy_combine, roomy_dropped = map(np.asarray, out)
    assert dispatch.shape == combine.shape == (t, E, cap)
    assert probs.shape == (t, E) and aux.shape == ()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert set(np.unique(dispatch)) <= {0.0, 1.0}
    assert dispatch.sum(axis=0).max() <= 1, "a slot holds at most one token"
    assert (dispatch.sum(axis=(0, 2)) <= cap).all(), "capacity respected"
    assert (combine >= 0).all() and np.all((combine > 0) <= (dispatch > 0))
    assert (combine.sum(axis=(1, 2)) <= 1 + 1e-5).all(), "combine weights sum to at most 1 per token"
    assert np.isfinite(aux) and aux > 0
    # with room for every token nothing is dropped and the weights sum to exactly 1
    assert int(roomy_dropped) == 0
    np.testing.assert_allclose(roomy_combine.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert all(len(set(row)) == K for row in idx), "a token picks distinct experts"
    # eager equals compiled
    np.testing.assert_allclose(np.asarray(router(x)[1]), combine, atol=1e-6)

    def aux_loss(params, rest):
        # copy=True: fresh variables at this trace level, which EPLB's training update may write
        r = nnx.merge(graphdef, params, rest, copy=True)
        return r.route(x, training=True, key=jax.random.key(0)).aux_loss

    grads = jax.jit(jax.grad(aux_loss))(params, rest)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert float(jnp.abs(grads["gate"]["kernel"][...]).sum()) > 0, "auxiliary loss reaches the gate"


def test_training_noise_is_seeded():
    router = make("base", noise_std=1.0)
    x = tokens(3)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    r1 = router.route(x, training=True, key=k1)
    r1b = router.route(x, training=True, key=k1)
    r2 = router.route(x, training=True, key=k2)
    np.testing.assert_array_equal(np.asarray(r1.probs), np.asarray(r1b.probs))
    assert not np.allclose(np.asarray(r1.probs), np.asarray(r2.probs))
    clean = router.route(x)  # eval: no noise
    np.testing.assert_array_equal(np.asarray(clean.logits), np.asarray(r1.logits))
    with pytest.raises(ValueError, match="key"):
        router.route(x, training=True)


def test_mixtral_and_qwen_gating_agree_and_qwen_unnormalised_sums_below_one():
    logits = jax.random.normal(jax.random.key(0), (10, E))
    p1, i1, g1 = R.top_k_gating(logits, K, "topk_softmax", True)
    p2, i2, g2 = R.top_k_gating(logits, K, "softmax_topk", True)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5)
    _, _, g3 = R.top_k_gating(logits, K, "softmax_topk", False)
    np.testing.assert_allclose(np.asarray(g3), np.sort(np.asarray(p2), -1)[:, ::-1][:, :K], rtol=1e-6)
    assert (np.asarray(g3).sum(-1) < 1).all()


# ---------------------------------------------------------------- Flex and Time, with and without inputs


def test_flex_with_and_without_modalities():
    router = make("flex")
    base = make("base")
    nnx.update(base, nnx.state(router.gate))  # same gate weights
    base.gate.kernel[...] = router.gate.kernel[...]
    x = tokens(4)
    np.testing.assert_allclose(np.asarray(router.route(x).probs), np.asarray(base.route(x).probs), atol=1e-6)
    image = jax.random.normal(jax.random.key(5), (2, 12, 6))
    genomic = jax.random.normal(jax.random.key(6), (2, 3))  # per sequence, broadcast over tokens
    info = {"image": image, "genomic": genomic}
    snapshot = dict(info)
    with_img = router.route(x, modality_info={"image": image})
    with_both = router.route(x, modality_info=info)
    assert info == snapshot and list(info) == ["image", "genomic"], "the caller's dict is not mutated"
    assert not np.allclose(np.asarray(with_img.probs), np.asarray(router.route(x).probs))
    assert not np.allclose(np.asarray(with_img.probs), np.asarray(with_both.probs))
    manual = np.asarray(router.route(x).logits) + np.asarray(image).reshape(24, 6) @ np.asarray(
        router.modality_proj["image"][...])
    np.testing.assert_allclose(np.asarray(with_img.logits), manual, atol=1e-5)
    d, c, p, aux = router(x, modality_info=info)
    assert d.shape[0] == 24 and np.isfinite(float(aux))


@pytest.mark.parametrize("info,match", [
    ({"image": jnp.zeros((2, 12, 5))}, r"modality_info\['image'\] has shape \(2, 12, 5\)"),
    ({"image": jnp.zeros((24, 6))},
     r"expected \(2, 12, 6\) \(per token\), \(2, 6\) \(per sequence\) or \(12, 6\) \(per position\)"),
    ({"audio": jnp.zeros((2, 12, 4))}, "unknown modalities"),
])
def test_flex_rejects_bad_modalities(info, match):
    with pytest.raises(ValueError, match=match):
        make("flex").route(tokens(), modality_info=info)


def test_time_router_with_and_without_timestamps():
    router = make("time")
    x = tokens(7)
    plain = router.route(x)
    ts = jnp.arange(24, dtype=jnp.float32).reshape(2, 12) * 5.0
    timed = router.route(x, timestamps=ts)
    per_seq = router.route(x, timestamps=jnp.array([3.0, 50.0]))
    assert not np.allclose(np.asarray(plain.logits), np.asarray(timed.logits))
    phi = R.time_features(ts.reshape(-1), router.periods, router.time_scale)
    np.testing.assert_allclose(np.asarray(timed.logits - plain.logits), np.asarray(phi @ router.time_proj[...]),
                               atol=1e-5)
    assert phi.shape == (24, 1 + 2 * len(router.periods))
    np.testing.assert_allclose(np.asarray(phi[:, 1] ** 2 + phi[:, 2] ** 2), 1.0, atol=1e-5)  # seasonality on a circle
    lg = np.asarray(per_seq.logits).reshape(2, 12, E) - np.asarray(plain.logits).reshape(2, 12, E)
    np.testing.assert_allclose(lg[:, 0], lg[:, 5], atol=1e-5)  # one timestamp per sequence
    with pytest.raises(ValueError, match=r"timestamps has shape \(5,\)"):
        router.route(x, timestamps=jnp.zeros((5,)))


def test_routers_reject_inputs_they_do_not_take():
    with pytest.raises(ValueError, match="does not take \\['timestamps'\\]"):
        make("base").route(tokens(), timestamps=jnp.zeros((2, 12)))
    make("base").route(tokens(), timestamps=None)  # None is "not given"


# ---------------------------------------------------------------- router-specific behaviour


def test_eplb_bias_balances_load_under_jit_and_only_in_training():
    router = make("eplb", bias_update_rate=0.1)
    x = tokens(8, (4, 32)) + 2.0 * router.gate.kernel[...][:, 0]  # skew towards expert 0

    def imbalance(r):
        load = np.bincount(np.asarray(r.route(x).expert_idx).ravel(), minlength=E)
        return load.max() / load.mean()

    before = imbalance(router)
    router(x)  # eval: no update
    assert float(jnp.abs(router.bias[...]).sum()) == 0.0
    with pytest.raises(ValueError, match="EPLBRouter updates its bias in training"):
        jax.jit(lambda x: router.route(x, training=True).aux_loss)(x)  # closed over: state not writable

    @nnx.jit
    def train_step(r, x):
        return r.route(x, training=True).aux_loss

    for _ in range(12):
        train_step(router, x)
    assert float(jnp.abs(router.bias[...]).sum()) > 0
    assert np.asarray(router.observed_load[...]).sum() == 4 * 32 * K
    assert imbalance(router) < before
    # the same update as a pure function on split state
    graphdef, state = nnx.split(router)

    @jax.jit
    def step(state, x):
        r = nnx.merge(graphdef, state)
        r.route(x, training=True)
        return nnx.state(r)

    new_state = step(state, x)
    old_bias, new_bias = state["bias"][...], new_state["bias"][...]
    load = np.asarray(new_state["observed_load"][...])
    expected = np.asarray(R.eplb_bias_update(old_bias, load, 0.1))
    np.testing.assert_allclose(np.asarray(new_bias), expected, atol=1e-7)
    assert np.sign(np.asarray(new_bias - old_bias))[np.argmax(load)] == -1, "the busiest expert goes down"


def test_sinkhorn_balances_skewed_routing():
    base = make("base")
    sk = make("sinkhorn", num_iters=20)
    sk.gate.kernel[...] = base.gate.kernel[...]
    x = tokens(9, (4, 32)) + 1.5 * base.gate.kernel[...][:, 0]

    def max_load(r):
        return np.bincount(np.asarray(r.route(x).expert_idx).ravel(), minlength=E).max()

    assert max_load(sk) < max_load(base)
    lp = R.sinkhorn_log(jax.random.normal(jax.random.key(0), (64, E)) * 3, 50)
    np.testing.assert_allclose(np.exp(np.asarray(lp)).sum(0), 64 / E, rtol=1e-3)
    np.testing.assert_allclose(np.exp(np.asarray(lp)).sum(1), 1.0, rtol=1e-2)


def test_hierarchical_chooses_experts_inside_the_top_groups():
    router = make("hierarchical", num_groups=4, top_groups=1)
    r = router.route(tokens(10))
    idx = np.asarray(r.expert_idx)
    assert (idx[:, 0] // 2 == idx[:, 1] // 2).all(), "both experts come from the single chosen group"
    np.testing.assert_allclose(np.asarray(r.probs).sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="num_groups=3"):
        make("hierarchical", num_groups=3)
    with pytest.raises(ValueError, match="top_k=2 exceeds"):
        create_moe_router("hierarchical", H, 8, 2, num_groups=8, top_groups=1)


def test_adaptive_uses_more_experts_for_important_tokens():
    router = create_moe_router("adaptive", H, E, 4, min_threshold=0.3, max_threshold=0.99)
    x = tokens(11)
    low = router.route(x, importance=jnp.zeros((2, 12)))
    high = router.route(x, importance=jnp.ones((2,)))
    k_low, k_high = np.asarray(router.experts_per_token(low)), np.asarray(router.experts_per_token(high))
    assert (k_low <= k_high).all() and k_high.mean() > k_low.mean()
    assert k_low.min() >= 1 and k_high.max() <= 4
    for r in (low, high):
        g = np.asarray(r.gates)
        np.testing.assert_allclose(g.sum(-1), 1.0, atol=1e-5)
        assert (g[~np.asarray(r.active)] == 0).all()
    learned = router.route(x)  # learned importance predictor
    assert learned.aux["importance"].shape == ()


def test_fast_router_random_routing_only_in_training():
    router = make("fast", random_routing=True)
    x = tokens(12, (4, 32))
    assert np.asarray(router.route(x).active).all()
    r = router.route(x, training=True, key=jax.random.key(0))
    active = np.asarray(r.active)
    assert active[:, 0].all() and not active[:, 1].all()
    np.testing.assert_allclose(np.asarray(r.gates).sum(-1), 1.0, atol=1e-5)


def test_mixture_router_has_separate_train_and_eval_capacity():
    router = make("mixture")
    assert router.capacity(128, training=True) == 40  # ceil(1.25 * 128 * 2 / 8)
    assert router.capacity(128, training=False) == 64  # ceil(2.0 * 128 * 2 / 8)
    x = tokens(13, (4, 32))
    _, train_plan = router.plan(x, training=True)
    _, eval_plan = router.plan(x)
    assert train_plan.dispatch.shape[-1] == 40 and eval_plan.dispatch.shape[-1] == 64
    assert int(train_plan.dropped) >= int(eval_plan.dropped)


def test_pikv_router_prefers_experts_holding_the_context():
    router = make("pikv", affinity_weight=50.0)
    x = tokens(14)
    counts = jnp.zeros((2, E)).at[:, 5].set(30.0)  # expert 5's shard holds each row's context
    r = router.route(x, cache_affinity=counts)
    assert (np.asarray(r.expert_idx)[:, 0] == 5).all()
    assert float(r.aux["cache_locality"]) == pytest.approx(1.0)
    plain = router.route(x)
    assert not (np.asarray(plain.expert_idx)[:, 0] == 5).all()
    with pytest.raises(ValueError, match="cache_affinity has shape"):
        router.route(x, cache_affinity=jnp.zeros((2, E + 1)))


# ---------------------------------------------------------------- errors


def test_construction_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"top_k=9 is larger than num_experts=8"):
        create_moe_router("base", H, 8, 9)
    with pytest.raises(ValueError, match="unknown router kind 'nope'"):
        create_moe_router("nope", H, 8, 2)
    with pytest.raises(ValueError, match="does not take \\['num_groups'\\]"):
        create_moe_router("base", H, 8, 2, num_groups=2)
    with pytest.raises(ValueError, match="gating="):
        create_moe_router("base", H, 8, 2, gating="argmax")
    with pytest.raises(ValueError, match="hidden_size=16"):
        make("base").route(jnp.zeros((3, 7)))
    assert isinstance(create_moe_router("topk", H, 8, 2), R.BaseRouter)
    assert isinstance(create_moe_router("cache_aware", H, 8, 2), R.PiKVRouter)
