"""The call shapes of PiKV's usage guide: routers take their extra input positionally
(`router(x, modality_info)`, `router(x, time_info)`), the flex router works without declared
modalities, the time router takes the guide's `seasonality`, and `DistributedPiKVMoE` builds without
a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pikv_jax.moe import DistributedPiKVMoE, PiKVMoE, create_moe_router

H, E, K, B, S = 16, 8, 2, 2, 6


def x_and(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (B, S, H)) for k in keys]


def test_flex_without_declared_modalities_scores_modalities_with_the_token_gate():
    router = create_moe_router("flex", hidden_size=H, num_experts=E, top_k=K)
    x, image, genomic, _ = x_and()
    info = {"image": image, "genomic": genomic}
    w = np.asarray(router.gate.kernel[...], np.float64)  # [H, E]
    want = (np.asarray(x, np.float64) + np.asarray(image, np.float64) + np.asarray(genomic, np.float64)) @ w
    got = router.route(x, modality_info=info).logits
    np.testing.assert_allclose(np.asarray(got).reshape(B, S, E), want, rtol=1e-4, atol=1e-4)
    # positional, as the guide calls it, equals the keyword call
    positional = router(x, info)
    keyword = router(x, modality_info=info)
    for a, b in zip(positional, keyword):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"modality_info\['image'\] has shape"):
        router(x, {"image": image[..., :3]})


def test_time_router_takes_the_guides_time_info_positionally():
    router = create_moe_router("time", hidden_size=H, num_experts=E, top_k=K)
    x = x_and()[0]
    ts = jnp.arange(S, dtype=jnp.float32)  # one vector for all rows, as in the guide
    season = jnp.sin(ts * 2 * jnp.pi / 24)
    dispatch, combine, probs, loss = router(x, {"timestamps": ts, "seasonality": season})
    assert dispatch.shape[:2] == (B * S, E) and probs.shape == (B * S, E) and np.isfinite(float(loss))
    base = router.route(x).logits
    with_ts = router.route(x, timestamps=ts).logits
    both = router.route(x, timestamps=ts, seasonality=season).logits
    # each signal adds its own term: seasonality adds season[t] * w_season
    extra = np.asarray(both - with_ts).reshape(B, S, E)
    want = np.asarray(season)[None, :, None] * np.asarray(router.season_proj[...])[None, None, :]
    np.testing.assert_allclose(extra, np.broadcast_to(want, extra.shape), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(with_ts), np.asarray(base))
    with pytest.raises(ValueError, match=r"takes \['timestamps', 'seasonality'\]"):
        router(x, {"timestamps": ts, "weather": ts})


def test_a_router_without_extra_inputs_rejects_a_positional_one():
    router = create_moe_router("base", hidden_size=H, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="no extra inputs"):
        router(x_and()[0], {"timestamps": jnp.zeros(S)})


def test_distributed_moe_builds_without_a_mesh_and_equals_the_single_device_layer():
    kw = dict(hidden_size=H, num_experts=E, top_k=K, rank=4, alpha=1.0, use_distillation=True,
              teacher_hidden_size=2 * H, capacity_factor=float(E) / K)
    dist = DistributedPiKVMoE(**kw, rngs=nnx.Rngs(0))
    single = PiKVMoE(**kw, rngs=nnx.Rngs(0))
    n = dist.mesh.shape["expert"]
    assert n >= 1 and E % n == 0 and dist.mesh.shape["data"] == 1
    x = x_and()[0]
    np.testing.assert_allclose(np.asarray(dist(x)), np.asarray(single(x)), rtol=1e-5, atol=1e-5)
