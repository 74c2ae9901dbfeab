"""KL / top-1 / NLL math of the fidelity and perplexity tasks."""

import numpy as np
import pytest

from pikv_jax.eval import fidelity as F


def _logp(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def test_kl_zero_for_identical_and_positive_otherwise():
    rng = np.random.default_rng(0)
    a = _logp(rng.normal(size=(3, 5, 11)))
    assert np.all(F.kl_divergence(a, a) == 0.0)
    b = _logp(rng.normal(size=(3, 5, 11)))
    kl = F.kl_divergence(a, b)
    assert kl.shape == (3, 5) and np.all(kl > 0)
    # against a direct formula
    p = np.exp(a)
    np.testing.assert_allclose(kl, np.sum(p * (a - b), -1), rtol=1e-10)


def test_kl_handles_zero_probabilities_and_shapes():
    with np.errstate(divide="ignore"):
        ref = np.log(np.array([[1.0, 0.0, 0.0]]))  # -inf entries where p == 0
    other = _logp(np.array([[2.0, 0.0, -1.0]]))
    kl = F.kl_divergence(ref, other)
    assert np.isfinite(kl).all() and kl[0] == pytest.approx(-other[0, 0])
    with pytest.raises(ValueError, match="shapes differ"):
        F.kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))


def test_top1_and_masks():
    a = _logp(np.array([[[3.0, 1, 0], [0, 2, 1]]]))
    b = _logp(np.array([[[2.0, 1, 0], [3, 2, 1]]]))
    assert F.top1_agreement(a, b).tolist() == [[True, False]]
    assert F.valid_mask([2, 1], 3).tolist() == [[True, True, False], [True, False, False]]


def test_nll_and_compare_respect_lengths():
    rng = np.random.default_rng(1)
    full = _logp(rng.normal(size=(2, 4, 7)))
    conts = [[1, 2, 3, 4], [5, 6]]
    lens = np.array([4, 2])
    tok = F.target_logprobs(full, conts)
    assert tok[0, 2] == full[0, 2, 3] and tok[1, 1] == full[1, 1, 6]
    st = F.nll_stats(tok, lens)
    expect = -(tok[0].sum() + tok[1, :2].sum()) / 6
    assert st["tokens"] == 6 and st["nll"] == pytest.approx(expect) and st["ppl"] == pytest.approx(np.exp(expect))
    ref = {"logprobs": full, "lengths": lens}
    same = F.compare(ref, ref)
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0 and same["positions"] == 6
    other = dict(ref, logprobs=_logp(rng.normal(size=(2, 4, 7))))
    assert F.compare(ref, other)["kl_mean"] > 0
