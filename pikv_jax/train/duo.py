"""DuoAttention gate learning (Xiao et al., 2024): which KV heads need the full cache.

Every (layer, KV head) gets a gate alpha in [0, 1]; the student's attention for the G query heads of
that KV head is

    out = alpha * attn_full + (1 - alpha) * attn_streaming

where streaming attention sees only the first `n_sink` positions and the last `window` ones (exactly
the cache a DuoAttention streaming head keeps). Mixing outputs equals mixing the two softmax
distributions before the value product, which is what is computed (one logits pass, two masks).
The base model is frozen; only the gates train, on synthetic passkey data (pikv_jax/train/data.py),
with

    loss = distill(student, teacher) + l1 * mean(alpha)

distill being, by default as in the paper, the MSE of the final hidden states at the question and
answer positions (relative to the teacher's mean square), and the L1 term pushing heads that do not
need the full context to streaming. Gates start at 1 (every head full, loss = l1); with gate=clip they
are clipped to [0, 1] after every update, with gate=sigmoid alpha = sigmoid(parameter).

After training the gates are binarised (top `retrieval_fraction` of heads over all layers, or alpha >=
`threshold`) and written as a pattern file in duo_pattern.py's format with method "distillation",
which `DuoAttention.from_pattern_file` loads.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax.attention.reference import NEG_INF, visible
from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.cache.policies.duo_attention import DuoAttention
from pikv_jax.calibrate import duo as dc
from pikv_jax.eval import passkey as pk
from pikv_jax.eval.methods import Method
from pikv_jax.train import strategies as st
from pikv_jax.train.data import planted_passkey_row
from pikv_jax.train.forward import forward_train, stop_gradient
from pikv_jax.train.task import Task, register_task


class GateParam(nnx.Param):
    """A DuoAttention gate parameter (alpha itself, or its logit with gate=sigmoid)."""


class DuoGates(nnx.Module):
    """alpha f32[num_layers, num_kv_heads] in [0, 1]."""

    def __init__(self, num_layers: int, num_kv_heads: int, *, init: float = 1.0, gate: str = "clip"):
        if gate not in ("clip", "sigmoid"):
            raise ValueError(f"gate={gate!r}; allowed: clip, sigmoid")
        raw = init if gate == "clip" else float(np.log(init / (1.0 - init)))
        self.raw = GateParam(jnp.full((num_layers, num_kv_heads), raw, jnp.float32))
        self.gate = gate

    def alpha(self):
        raw = self.raw[...]
        return jnp.clip(raw, 0.0, 1.0) if self.gate == "clip" else jax.nn.sigmoid(raw)


class DuoStudent(nnx.Module):
    def __init__(self, model, gates: DuoGates):
        self.model = model
        self.gates = gates


def mixed_attention(alpha, n_sink: int, window: int, sliding_window=None):
    """Attention whose KV head h of layer l mixes full and streaming attention with alpha[l, h]."""

    def attend(layer, q, k, v, pos):
        b, t, h, d = q.shape
        hk = k.shape[2]
        qg = q.reshape(b, t, hk, h // hk, d)
        logits = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
        qp, kp = pos[:, None, None, :, None], pos[:, None, None, None, :]
        full = visible(qp, kp, sliding_window)
        stream = full & ((kp < n_sink) | (kp > qp - window))

        def probs(mask):
            return jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)

        a = alpha[layer].astype(jnp.float32)[None, :, None, None, None]
        p = a * probs(full) + (1.0 - a) * probs(stream)
        out = jnp.einsum("bhgts,bshd->bthgd", p, v.astype(jnp.float32))
        return out.reshape(b, t, h, d).astype(q.dtype)

    return attend


@register_task
class DuoTask(Task):
    name = "duo"

    def build(self):
        c, dcfg = self.base.config, self.cfg.duo
        self.strategy = st.from_loss_config(self.cfg.loss)
        self._want = dict(hidden=self.cfg.loss.hidden > 0, attn=self.cfg.loss.attention > 0,
                          logits_from=0 if self.cfg.loss.logit > 0 else None)
        if self.batches.seq_len <= dcfg.n_sink + dcfg.window:
            raise ValueError(f"data.seq_len={self.batches.seq_len} must exceed duo.n_sink + duo.window = "
                             f"{dcfg.n_sink + dcfg.window}: streaming and full attention would be identical")
        return DuoStudent(self.base.model, DuoGates(c.num_hidden_layers, c.num_key_value_heads, init=dcfg.init,
                                                    gate=dcfg.gate))

    @property
    def trainable(self):
        return GateParam

    def distill(self, model, alpha, batch, *, remat=False):
        """(distillation loss, metrics) of the student with gates `alpha` f32[L, Hkv]."""
        d = self.cfg.duo
        tokens, lengths = batch["tokens"], batch["lengths"]
        teacher = stop_gradient(forward_train(model, tokens, lengths, **self._want))
        attention = mixed_attention(alpha, d.n_sink, d.window, model.config.sliding_window)
        student = forward_train(model, tokens, lengths, attention=attention, remat=remat, **self._want)
        return self.strategy.compute_loss(student, teacher, batch)

    def loss(self, module, batch, rng, *, train: bool = True):
        alpha = module.gates.alpha()
        distill, metrics = self.distill(module.model, alpha, batch, remat=self.cfg.train.remat and train)
        l1 = jnp.mean(alpha)
        metrics = dict(metrics, distill=distill, alpha_mean=l1, alpha_min=jnp.min(alpha), alpha_max=jnp.max(alpha))
        return distill + self.cfg.duo.l1 * l1, metrics

    def project(self, params):
        if self.cfg.duo.gate != "clip":
            return params
        return {k: (jnp.clip(v, 0.0, 1.0) if k.endswith("raw") else v) for k, v in params.items()}

    # ------------------------------------------------------------------ results

    def alpha_of(self, sp, params) -> np.ndarray:
        module = sp.merge(jax.tree.map(jnp.asarray, params))
        return np.asarray(module.gates.alpha(), np.float64)

    def pattern(self, alpha: np.ndarray, metadata: dict | None = None) -> dc.HeadPattern:
        d = self.cfg.duo
        retrieval = dc.binarize(alpha, retrieval_fraction=d.retrieval_fraction, threshold=d.threshold)
        meta = dict(model=self.cfg.model.name, steps=self.cfg.train.steps, l1=d.l1, gate=d.gate,
                    seq_len=self.batches.seq_len, data=self.batches.source, seed=self.cfg.train.seed)
        meta.update(metadata or {})
        return dc.HeadPattern(retrieval=retrieval, n_sink=d.n_sink, window=d.window,
                              scores=tuple(tuple(float(x) for x in r) for r in alpha), method="distillation",
                              retrieval_fraction=d.retrieval_fraction, threshold=d.threshold, metadata=meta)

    def evaluate(self, sp, initial, final, heldout, place) -> dict:
        """Held-out loss of the gates, then the binarised learned pattern against random patterns with
        the same number of retrieval heads (distillation loss with hard 0/1 gates, lower is better)."""
        out = super().evaluate(sp, initial, final, heldout, place)
        learned = np.asarray(self.pattern(self.alpha_of(sp, final)).retrieval, np.float32)
        n_ret = int(learned.sum())
        fn = jax.jit(lambda frozen, params, alpha, b: self.distill(sp.merge(params, frozen).model, alpha, b)[0])
        frozen, params = place(sp.frozen, replicate=True), place(final, replicate=True)
        batches = [place(b) for b in heldout]

        def score(pattern):
            a = place(jnp.asarray(pattern, jnp.float32), replicate=True)
            return float(np.mean([float(fn(frozen, params, a, b)) for b in batches]))

        randoms = random_patterns(learned.shape, n_ret, self.cfg.duo.random_patterns, seed=self.cfg.train.seed)
        rand_scores = [score(p) for p in randoms]
        learned_score = score(learned)
        out["pattern"] = dict(retrieval_heads=n_ret, num_heads=int(learned.size), learned_loss=learned_score,
                              random_losses=rand_scores,
                              random_loss_mean=float(np.mean(rand_scores)) if rand_scores else None,
                              beats_random=(float(np.mean([learned_score < r for r in rand_scores]))
                                            if rand_scores else None))
        return out

    def export(self, module, run_dir) -> dict:
        alpha = np.asarray(module.gates.alpha(), np.float64)
        pat = self.pattern(alpha)
        path = pathlib.Path(run_dir) / self.cfg.duo.pattern_file
        dc.save_pattern(path, pat)
        flat = [x for r in pat.retrieval for x in r]
        return {"pattern_file": str(path), "retrieval_heads": int(sum(flat)), "num_heads": len(flat)}


def random_patterns(shape, num_retrieval: int, count: int, *, seed: int = 0) -> list[np.ndarray]:
    """`count` random 0/1 patterns of `shape` with exactly `num_retrieval` ones (retrieval heads)."""
    rng = np.random.default_rng([seed, 77])
    out = []
    size = int(np.prod(shape))
    for _ in range(count):
        flat = np.zeros(size, np.float32)
        flat[rng.choice(size, num_retrieval, replace=False)] = 1.0
        out.append(flat.reshape(shape))
    return out


def as_retrieval(pattern) -> tuple[tuple[bool, ...], ...]:
    """Nested bools from a HeadPattern, a 0/1 array or nested sequences."""
    if isinstance(pattern, dc.HeadPattern):
        return pattern.retrieval
    return tuple(tuple(bool(x) for x in row) for row in np.asarray(pattern))


def passkey_comparison(base, patterns: dict, *, n_sink: int, window: int, context_len: int, num_cases: int = 8,
                       seed: int = 0, modes=("query_agnostic",), haystacks=("repetitive",), key_len: int = 8,
                       max_new_tokens: int = 8, batch_size: int = 4) -> dict:
    """Passkey accuracy of DuoAttention under each pattern ({label: HeadPattern or 0/1 array}).

    With a tokenizer: the passkey harness (pikv_jax/eval/passkey.py; answer substring match) on
    `num_cases` contexts of `context_len` tokens at evenly spread depths, plus the full cache as the
    reference. Without one (random-weight models): planted random-id keys; the context is compressed,
    the key's first half is fed through the decode path (query-agnostic) and a case counts as correct
    when the generated tokens equal the full cache's (agreement with the teacher).
    Returns {"accuracy": {label: float}, "n": cases (x modes), "mode": ...}.
    """
    policies = {label: DuoAttention(pattern=as_retrieval(p), n_sink=n_sink, window=window)
                for label, p in patterns.items()}
    if base.tokenizer is not None:
        depths = [(i + 0.5) / num_cases for i in range(num_cases)]
        cases = pk.build_cases(pk.codec_for(base), contexts=[context_len], depths=depths, seeds=[seed],
                               haystacks=list(haystacks))
        methods = [Method(spec="full", label="full", policy=_full(), budget=None, components=("full",))]
        methods += [Method(spec=lab, label=lab, policy=pol, budget=None, components=("duo_attention",))
                    for lab, pol in policies.items()]
        records = pk.run_passkey(base, methods, cases, modes=modes, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
        acc = {row["method"]: row["accuracy"] for row in pk.summarize(records, keys=("method",))}
        return {"accuracy": acc, "n": len(cases) * len(modes), "mode": list(modes), "metric": "answer substring"}

    rng = np.random.default_rng([seed, 31337])
    rows = [planted_passkey_row(rng, context_len, base.config.vocab_size, key_len)[0] for _ in range(num_cases)]
    end = context_len - key_len
    prompts = [r[:end] for r in rows]
    cues = [r[end:end + key_len // 2] for r in rows]
    n_new = key_len - key_len // 2
    ref = base.generate(prompts, n_new, suffixes=cues, stop_ids=()).token_ids
    acc = {"full": 1.0}
    for label, pol in policies.items():
        out = base.generate(prompts, n_new, suffixes=cues, policy=pol, stop_ids=()).token_ids
        acc[label] = float(np.mean([a == b for a, b in zip(out, ref)]))
    return {"accuracy": acc, "n": num_cases, "mode": ["query_agnostic"], "metric": "agreement with the full cache"}


def _full():
    return CachePolicy()


__all__ = ["DuoGates", "DuoStudent", "DuoTask", "GateParam", "as_retrieval", "mixed_attention", "passkey_comparison",
           "random_patterns"]
