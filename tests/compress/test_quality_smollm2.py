"""KIVI quantization quality on SmolLM2 (slow): teacher-forced perplexity of a 256-token continuation
after a 256-token prompt of held-out text (the end of pikv_jax/data/haystack_varied.txt), int8 and
int4 at their defaults (G = 64 / 32, R = 64) against the full cache (KIVI's paper setting, G = 32 and
R = 128, measured the same: benchmarks/kivi-compact.json)."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest

from pikv_jax.cache.policies import CachePolicy
from pikv_jax.compress.kivi import QuantizedPolicy

PROMPT, CONT = 256, 256


def heldout_text() -> str:
    raw = importlib.resources.files("pikv_jax.data").joinpath("haystack_varied.txt").read_text(encoding="utf-8")
    paras = [p.strip() for p in raw.split("\n\n") if p.strip()]
    return " ".join(" ".join(paras[int(0.6 * len(paras)):]).split())


def nll(model, policy, prompt, cont) -> float:
    lp, n = model.teacher_forced([prompt], [cont], policy=policy)
    return float(-lp[0, : n[0]].mean())


@pytest.mark.slow
def test_int8_and_int4_perplexity_change(smollm2):
    ids = smollm2.tokenizer.encode(heldout_text())
    assert len(ids) >= PROMPT + CONT
    prompt, cont = ids[:PROMPT], ids[PROMPT: PROMPT + CONT]
    base = nll(smollm2, CachePolicy(), prompt, cont)
    change = {bits: np.exp(nll(smollm2, QuantizedPolicy(bits=bits), prompt, cont) - base) - 1 for bits in (8, 4)}
    print(f"full ppl {np.exp(base):.4f}; change int8 {100 * change[8]:+.4f}%, int4 {100 * change[4]:+.4f}%")
    assert change[4] != 0.0  # the int4 cache really quantized something
    assert abs(change[8]) < 0.005
    assert abs(change[4]) < 0.03
