"""Distillation strategies: exact losses on small cases against NumPy, and argument validation."""

from __future__ import annotations

import numpy as np
import pytest

from pikv_jax.train.config import LossSection
from pikv_jax.train.forward import Outputs
from pikv_jax.train.strategies import (
    AttentionOutputDistillation,
    Combined,
    HiddenStateDistillation,
    LogitDistillation,
    from_loss_config,
)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _case(seed=0, b=2, t=5, v=7):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    te = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    mask = (rng.uniform(size=(b, t)) > 0.3).astype(np.float32)
    mask[0, 0] = 1.0
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    return s, te, mask, labels


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_kl_is_temperature_squared_kl_over_masked_positions(temperature):
    s, te, mask, labels = _case()
    strat = LogitDistillation(temperature=temperature)
    loss, m = strat.compute_loss(Outputs(logits=s), Outputs(logits=te), {"mask": mask, "labels": labels})
    lps, lpt = _np_log_softmax(s / temperature), _np_log_softmax(te / temperature)
    kl = (np.exp(lpt) * (lpt - lps)).sum(-1)
    want = (kl * mask).sum() / mask.sum() * temperature ** 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), want, rtol=1e-5)


def test_logit_hard_label_mix_and_offset_outputs():
    s, te, mask, labels = _case(1)
    strat = LogitDistillation(temperature=2.0, alpha=0.25)
    off = 2  # outputs that start at position 2 score mask[:, 2:] and labels[:, 2:]
    loss, m = strat.compute_loss(Outputs(logits=s[:, off:], logits_from=off),
                                 Outputs(logits=te[:, off:], logits_from=off), {"mask": mask, "labels": labels})
    mk, lb = mask[:, off:], labels[:, off:]
    lps, lpt = _np_log_softmax(s[:, off:] / 2), _np_log_softmax(te[:, off:] / 2)
    kl = ((np.exp(lpt) * (lpt - lps)).sum(-1) * mk).sum() / mk.sum() * 4
    nll = -np.take_along_axis(_np_log_softmax(s[:, off:]), lb[..., None], -1)[..., 0]
    ce = (nll * mk).sum() / mk.sum()
    np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.25 * kl + 0.75 * ce, rtol=1e-5)


def test_kl_of_identical_logits_is_zero_and_empty_mask_gives_zero():
    s, _, mask, labels = _case(2)
    loss, _ = LogitDistillation().compute_loss(Outputs(logits=s), Outputs(logits=s), {"mask": mask})
    assert abs(float(loss)) < 1e-6
    loss, _ = LogitDistillation().compute_loss(Outputs(logits=s), Outputs(logits=s + 1.0),
                                               {"mask": np.zeros_like(mask)})
    assert float(loss) == 0.0


def test_hidden_and_attention_mse_match_numpy():
    rng = np.random.default_rng(3)
    hs = [rng.normal(size=(2, 4, 6)).astype(np.float32) for _ in range(3)]
    ht = [rng.normal(size=(2, 4, 6)).astype(np.float32) for _ in range(3)]
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], np.float32)

    def mse(a, b, norm=False):
        e = ((a - b) ** 2).mean(-1)
        v = (e * mask).sum() / mask.sum()
        return v / (((b ** 2).mean(-1) * mask).sum() / mask.sum()) if norm else v

    loss, _ = HiddenStateDistillation(layers=(0, -1)).compute_loss(Outputs(hidden=tuple(hs)), Outputs(hidden=tuple(ht)),
                                                                    {"mask": mask})
    np.testing.assert_allclose(float(loss), (mse(hs[0], ht[0]) + mse(hs[2], ht[2])) / 2, rtol=1e-5)
    loss, _ = HiddenStateDistillation(normalize=True).compute_loss(Outputs(hidden=tuple(hs)), Outputs(hidden=tuple(ht)),
                                                                    {"mask": mask})
    np.testing.assert_allclose(float(loss), mse(hs[2], ht[2], True), rtol=1e-5)
    a_s = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)  # [B, T, H, D]
    a_t = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    loss, _ = AttentionOutputDistillation(layers=(0,)).compute_loss(Outputs(attn=(a_s,)), Outputs(attn=(a_t,)),
                                                                     {"mask": mask})
    e = ((a_s - a_t) ** 2).reshape(2, 4, -1).mean(-1)
    np.testing.assert_allclose(float(loss), (e * mask).sum() / mask.sum(), rtol=1e-5)


def test_combined_is_the_weighted_sum():
    s, te, mask, labels = _case(4)
    hs, ht = (s[..., :3],), (te[..., :3],)
    batch = {"mask": mask, "labels": labels}
    a, _ = LogitDistillation(temperature=2.0).compute_loss(Outputs(logits=s), Outputs(logits=te), batch)
    b, _ = HiddenStateDistillation().compute_loss(Outputs(hidden=hs), Outputs(hidden=ht), batch)
    comb = Combined(terms=((0.5, LogitDistillation(temperature=2.0)), (3.0, HiddenStateDistillation())))
    loss, m = comb.compute_loss(Outputs(logits=s, hidden=hs), Outputs(logits=te, hidden=ht), batch)
    np.testing.assert_allclose(float(loss), 0.5 * float(a) + 3.0 * float(b), rtol=1e-5)
    assert {"logit", "hidden", "logit_kl"} <= set(m)
    built = from_loss_config(LossSection(logit=0.5, temperature=2.0, hidden=3.0, normalize=False))
    np.testing.assert_allclose(float(built.compute_loss(Outputs(logits=s, hidden=hs), Outputs(logits=te, hidden=ht),
                                                        batch)[0]), float(loss), rtol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda: LogitDistillation(temperature=0.0), "temperature"),
    (lambda: LogitDistillation(temperature=float("inf")), "temperature"),
    (lambda: LogitDistillation(alpha=1.5), "alpha"),
    (lambda: LogitDistillation(alpha=-0.1), "alpha"),
    (lambda: HiddenStateDistillation(layers=(0.5,)), "layers"),
    (lambda: AttentionOutputDistillation(layers=("a",)), "layers"),
    (lambda: Combined(terms=()), "at least one"),
    (lambda: Combined(terms=((-1.0, LogitDistillation()),)), ">= 0"),
    (lambda: Combined(terms=((0.0, LogitDistillation()),)), "every strategy weight is 0"),
    (lambda: from_loss_config(LossSection(logit=0.0)), "at least one"),
])
def test_bad_arguments_raise_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_runtime_mismatches_raise_clear_errors():
    s, te, mask, labels = _case(5)
    with pytest.raises(ValueError, match="differ in shape"):
        LogitDistillation().compute_loss(Outputs(logits=s), Outputs(logits=te[:, :3]), {"mask": mask})
    with pytest.raises(ValueError, match="labels"):
        LogitDistillation(alpha=0.5).compute_loss(Outputs(logits=s), Outputs(logits=te), {"mask": mask})
    with pytest.raises(ValueError, match="did not collect"):
        HiddenStateDistillation().compute_loss(Outputs(), Outputs(hidden=(te,)), {"mask": mask})
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateDistillation(layers=(4,)).compute_loss(Outputs(hidden=(s,)), Outputs(hidden=(te,)), {"mask": mask})
    with pytest.raises(ValueError, match="teacher_proj"):
        HiddenStateDistillation().compute_loss(Outputs(hidden=(s,)), Outputs(hidden=(te[..., :3],)), {"mask": mask})
