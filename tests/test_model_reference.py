"""SmolLM2 from the bundled GGUF against Hugging Face transformers' outputs for the same weights
(tests/golden/smollm2_transformers.json): last-position logits, top-10 ids and greedy continuations.

Logits come from the cached path (`forward.prefill`); the greedy continuations from
`PiKVModel.generate` with all four golden prompts as one ragged batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.cache.state import init_cache
from pikv_jax.runtime import forward

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-3


def _check_against_golden(name, logits, golden):
    """logits: f32[V] at the last prompt position."""
    logits = np.asarray(logits, np.float64)
    top10 = golden["top10"]
    want_ids = [t["id"] for t in top10]
    got_ids = np.argsort(-logits, kind="stable")[:10].tolist()
    assert got_ids == want_ids, f"{name}: top-10 ids {got_ids} != transformers' {want_ids}"
    err_top = max(abs(logits[t["id"]] - t["logit"]) for t in top10)
    err_first = np.abs(logits[:16] - np.array(golden["logits_first16"])).max()
    assert max(err_top, err_first) < LOGIT_TOL, f"{name}: max abs logit error {max(err_top, err_first):.2e}"
    logprobs = logits - np.logaddexp.reduce(logits)
    err_lp = max(abs(logprobs[t["id"]] - t["logprob"]) for t in top10)
    assert err_lp < LOGIT_TOL, f"{name}: log-probability error {err_lp:.2e}"
    # whole-vector statistics (the golden file records them to ~6 digits)
    assert abs(logits.mean() - golden["logits_mean"]) < 1e-3
    assert abs(logits.std() - golden["logits_std"]) < 1e-3


@pytest.mark.parametrize("index", [0, 1, 2])
def test_short_prompts_logits_match_transformers(smollm2_stepwise, reference, index):
    """capital / story / chat, as rows of one right-padded batch through prefill."""
    s = smollm2_stepwise
    name = s["names"][index]
    _check_against_golden(name, s["logits"][index, 0], reference["prompts"][name])


def test_long_prompt_logits_match_transformers(smollm2, reference):
    """long_passkey (995 tokens): long-range RoPE, the blocked causal prefill, a 995-slot cache."""
    golden = reference["prompts"]["long_passkey"]
    ids = golden["input_ids"]
    assert len(ids) == golden["n_tokens"] == 995
    cfg = smollm2.config
    graphdef = smollm2.graphdef

    @jax.jit
    def run(params, tokens, lengths, cache):
        model = nnx.merge(graphdef, params)
        return forward.prefill(model, tokens, lengths, cache, CachePolicy())

    cache = init_cache(1, len(ids), num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                       head_dim=cfg.dim_per_head)
    logits, cache = run(smollm2.params, jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32), cache)
    _check_against_golden("long_passkey", logits[0], golden)
    assert int(cache.length[0]) == len(ids)
    assert int(jnp.min(cache.layers[0].pos)) == 0  # every slot holds a prompt token


def test_greedy_continuations_of_ragged_batch_match_transformers(smollm2, reference):
    """All four prompts (5 to 995 tokens) in one batch through the jitted prefill + decode loop."""
    names = list(reference["prompts"])
    prompts = [reference["prompts"][n]["input_ids"] for n in names]
    out = smollm2.generate(prompts, max_new_tokens=24)
    for i, name in enumerate(names):
        want = reference["prompts"][name]["greedy24_ids"]
        assert out.token_ids[i] == want, f"{name}: {out.token_ids[i]} != {want}"
        if len(want) < 24:  # the chat answer ends with <|im_end|> (EOS), included in both
            assert want[-1] == smollm2.config.eos_token_id
            assert out.finish_reasons[i] == "stop_token"
        else:
            assert out.finish_reasons[i] == "max_tokens"
        assert out.texts[i] == smollm2.tokenizer.decode(want)
    assert "chat" in names and len(reference["prompts"]["chat"]["greedy24_ids"]) < 24
    stats = smollm2.get_stats()
    assert stats["batch"] == 4 and stats["generated_tokens"] == sum(len(t) for t in out.token_ids)
