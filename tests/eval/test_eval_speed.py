"""The decode-speed program runs what `generate` runs: the same bound policy and the same tokens."""

import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies.kvzip import context_scorer
from pikv_jax.config import tiny_config
from pikv_jax.eval.methods import parse_method
from pikv_jax.eval.speed import DecodeProgram


def test_decode_program_binds_the_policy_as_generate_does():
    """A global KVzip budget needs the layer shares that binding calibrates: the speed program used to
    raise for it (and ran KVzip without its repeat instruction); now its tokens equal generate's."""
    model = PiKVModel.from_config(tiny_config(max_position_embeddings=2048))
    method = parse_method("adakv(kvzip(budget_scope=global))@0.5", model=model, context_len=64)
    prompt = np.random.default_rng(0).integers(3, 90, 64).tolist()
    prog = DecodeProgram(model, method.policy, [prompt], 4)
    assert len(context_scorer(prog.policy).layer_fractions) == model.config.num_hidden_layers
    out = prog.run_once()
    want = model.generate([prompt], 4, policy=method.policy, stop_ids=())
    assert out.token_ids == want.token_ids and out.stats["kept_tokens"] == want.stats["kept_tokens"]
