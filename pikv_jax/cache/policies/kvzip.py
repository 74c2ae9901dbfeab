"""KVzip (Kim et al., 2025): query-agnostic prompt selection by context reconstruction.

A KV pair matters for any future question if the model needs it to *reproduce* the context. KVzip
feeds, after the prompt, an instruction to repeat the context followed by the context itself, and
scores each prompt KV by the largest attention it receives from those repeat queries (maximum over
the repeat queries and over the query heads of its GQA group). The repeat input is processed in
chunks of `chunk_size` context tokens, each chunk preceded by the instruction and attending to the
whole prompt's KV plus itself (causal), so the attention matrix held at once is
[chunk + instruction] x [prompt + chunk + instruction] per head, not quadratic in the prompt.

The scoring pass is run by the runtime (`runtime.forward.reconstruction_scores`) after the
prefill's forward, over the KV that forward computed, and handed to the policy in
`PrefillContext.shared[CONTEXT_SCORES]`; the layers select after it. The cost is the prefill plus the
repeat pass (about as many tokens again, attending to the prompt): 3.6x a plain prefill at 2k on
CPU (`scripts/bench_prefill.py`; the paper reports 2-3x on GPUs); decode is unchanged. Prefill selection only:
compose with a decode-time policy (`kvzip+h2o`) to evict while decoding.

Budgets. `budget_scope="layer"` (default): every layer keeps the same budget; per head within a
layer with `adakv(kvzip)`. `budget_scope="global"`: the paper's ranking of every (layer, head,
token) score together, which gives layers unequal budgets. Under jit a layer's cache has a static
size, so a per-prompt split would recompile for every prompt; instead the layers' shares of the
budget (`layer_fractions`, mean 1, so the model's total is the uniform one) come from one global
ranking of KVzip scores on the calibration text (`runtime.capture.kvzip_layer_fractions`, run by
`PiKVModel.bind_policy`), and each prompt's tokens are then ranked within each layer (across its
heads too with `adakv(kvzip(budget_scope=global))`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from pikv_jax.cache.policies.base import NESTED_POLICY_FIELDS, CachePolicy, PrefillContext, map_policies

CONTEXT_SCORES = "context_scores"  # key of PrefillContext.shared: tuple of f32[B, Hkv, S], one per layer
REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly.\n\n"
BUDGET_SCOPES = ("layer", "global")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVzip(CachePolicy):
    """repeat_prompt_ids: token ids of the repeat instruction (`REPEAT_INSTRUCTION` encoded by the
    model's tokenizer; `parse_method(..., model=...)` and `PiKVModel` fill them). chunk_size:
    context tokens per repeat chunk, default 512 (bounded memory; the paper uses 2048 on GPUs).
    n_sink: first positions always kept, default 4. decode_evict must stay False.
    budget_scope: "layer" (equal budgets per layer) or "global" (calibrated layer shares, see the
    module doc); layer_fractions: those shares (filled by `PiKVModel.bind_policy`)."""

    name: ClassVar[str] = "kvzip"
    repeat_prompt_ids: tuple[int, ...] = ()
    chunk_size: int = 512
    budget_scope: str = "layer"
    layer_fractions: tuple[float, ...] = ()

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"budget_scope must be one of {', '.join(BUDGET_SCOPES)}, got {self.budget_scope!r}")
        object.__setattr__(self, "layer_fractions", tuple(float(f) for f in self.layer_fractions))
        if self.layer_fractions and (self.budget_scope != "global" or min(self.layer_fractions) < 0):
            raise ValueError("layer_fractions are the calibrated layer shares of budget_scope='global' (each >= 0); "
                             f"got {self.layer_fractions!r} with budget_scope={self.budget_scope!r}")
        object.__setattr__(self, "repeat_prompt_ids", tuple(int(t) for t in self.repeat_prompt_ids))
        if self.decode_evict:
            raise ValueError("kvzip scores tokens only at prefill, so it cannot evict at decode time; "
                             "compose it with a decode-time policy (e.g. kvzip+h2o@0.25)")
        super().__post_init__()

    def layer_fraction(self, layer: int) -> float:
        if self.budget_scope == "layer":
            return 1.0
        if not self.layer_fractions:
            raise ValueError("kvzip(budget_scope=global) needs its calibrated layer_fractions; PiKVModel.bind_policy "
                             "(called by generate) computes them, or runtime.capture.kvzip_layer_fractions")
        return self.layer_fractions[layer]

    def prefill_scores(self, layer: int, ctx: PrefillContext):
        scores = ctx.shared.get(CONTEXT_SCORES)
        if scores is None:
            raise ValueError("kvzip needs the scores of the reconstruction pass, which runtime.forward.prefill "
                             "runs (PiKVModel.generate calls it)")
        return jnp.where(ctx.pos[:, None, :] >= 0, scores[layer], -jnp.inf)


def context_scorer(policy: CachePolicy) -> KVzip | None:
    """The KVzip policy inside `policy` (itself, AdaKV's scorer, a Composite's prefill policy, a
    compression wrapper's inner policy, a per-layer policy), or None: the runtime runs the
    reconstruction pass only when there is one."""
    if isinstance(policy, KVzip):
        return policy
    subs = [getattr(policy, a, None) for a in NESTED_POLICY_FIELDS if a != "decode_policy"]  # prefill scores only
    subs += list(getattr(policy, "policies", ()) or ())
    for sub in subs:
        found = context_scorer(sub) if isinstance(sub, CachePolicy) else None
        if found is not None:
            return found
    return None


def with_repeat_prompt(policy: CachePolicy, ids) -> CachePolicy:
    """`policy` with every KVzip inside it given the repeat-instruction token ids (others unchanged)."""
    ids = tuple(int(t) for t in ids)
    return map_policies(policy, lambda p: dataclasses.replace(p, repeat_prompt_ids=ids) if isinstance(p, KVzip) else p)


def with_layer_fractions(policy: CachePolicy, fractions) -> CachePolicy:
    """`policy` with every KVzip inside it given calibrated `layer_fractions` (others unchanged)."""
    fractions = tuple(float(f) for f in fractions)
    return map_policies(policy, lambda p: dataclasses.replace(p, layer_fractions=fractions)
                        if isinstance(p, KVzip) else p)
