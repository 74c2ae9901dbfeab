"""LoRA compressor distillation: a learned low-rank KV cache trained against the full-cache teacher.

Student: the frozen base model whose keys (after RoPE) and values pass, in every layer and KV head,
through a `LoRACompressor` (pikv_jax/compress/lora.py) before attention:

    codes = x @ down [D, r]        (dropout on the codes in training, when configured)
    x^    = (alpha / r) codes @ up [r, D]

which is what the compressed cache holds at inference (`LowRankPolicy` stores the codes and attends in
code space, an identical function). The prefill of a compressed cache is exact (kvpress semantics): the
first `data.prefix_len` positions attend over exact keys/values, later positions over the
reconstructions of every cached token, so the training forward equals teacher-forced decoding with
`compressor.as_policy()` (tested). Teacher: the same model with exact attention. Loss: the configured
strategies (default: KL of next-token distributions at positions >= prefix_len).

Initialisation (lora.init=svd): the SVD basis of the base model's keys/values on the training text, at
which point the compressor equals `SVDCompressor` of the same rank: the "initial" held-out numbers
are the SVD baseline.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax.attention import dispatch
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.intmath import cdiv
from pikv_jax.train import strategies as st
from pikv_jax.train.forward import forward_train, stop_gradient
from pikv_jax.train.task import Task, register_task

CALIB_STREAM = 2_000_003


class LoRAStudent(nnx.Module):
    """The frozen base model and the trained compressor."""

    def __init__(self, model, compressor: LoRACompressor):
        self.model = model
        self.compressor = compressor


def reconstruct(comp: LoRACompressor, k, v, layer: int, key=None):
    """k, v [B, T, Hkv, D] -> their reconstructions (float32), as LoRACompressor.reconstruct computes
    them (same parameters, same math), with dropout on the codes when `key` is given."""
    ck = jnp.einsum("bthd,hdr->bthr", k.astype(jnp.float32), comp.k_down[...][layer])
    cv = jnp.einsum("bthd,hdr->bthr", v.astype(jnp.float32), comp.v_down[...][layer])
    rate = comp.dropout_rate
    if key is not None and rate > 0:
        kk, kv = jax.random.split(jax.random.fold_in(key, layer))
        ck = jnp.where(jax.random.bernoulli(kk, 1 - rate, ck.shape), ck / (1 - rate), 0.0)
        cv = jnp.where(jax.random.bernoulli(kv, 1 - rate, cv.shape), cv / (1 - rate), 0.0)
    rk = comp.scaling * jnp.einsum("bthr,hrd->bthd", ck, comp.k_up[...][layer])
    rv = comp.scaling * jnp.einsum("bthr,hrd->bthd", cv, comp.v_up[...][layer])
    return rk, rv


def compressed_attention(comp: LoRACompressor, prefix_len: int, sliding_window=None, key=None):
    """Attention where queries at positions >= prefix_len see reconstructed keys/values of all tokens
    and earlier queries exact ones (the compressed cache's prefill is exact)."""

    def attend(layer, q, k, v, pos):
        rk, rv = reconstruct(comp, k, v, layer, key)
        rk, rv = rk.astype(k.dtype), rv.astype(v.dtype)
        p = prefix_len
        if p == 0:
            return dispatch.chunk_attention(q, rk, rv, pos, pos, sliding_window=sliding_window, causal_prefix=True)[0]
        exact = dispatch.chunk_attention(q[:, :p], k[:, :p], v[:, :p], pos[:, :p], pos[:, :p],
                                         sliding_window=sliding_window, causal_prefix=True)[0]
        comp_out = dispatch.chunk_attention(q[:, p:], rk, rv, pos[:, p:], pos, sliding_window=sliding_window)[0]
        return jnp.concatenate([exact, comp_out], axis=1)

    return attend


@register_task
class LoRATask(Task):
    name = "lora"

    def build(self):
        c, lc = self.base.config, self.cfg.lora
        if lc.rank > c.dim_per_head:
            raise ValueError(f"lora.rank={lc.rank} is larger than the head dimension {c.dim_per_head}")
        comp = LoRACompressor.for_model(c, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, seed=self.cfg.train.seed)
        rows = max(1, cdiv(lc.calib_tokens, self.batches.seq_len))
        calib = self.batches.stream(CALIB_STREAM, rows)
        self.calib_prompts = [list(map(int, t[:n])) for t, n in zip(calib["tokens"], calib["lengths"])]
        if lc.init == "svd":  # SVD of the training text's keys/values: step 0 = SVDCompressor(rank)
            comp.calibrate(self.base, prompts=self.calib_prompts, max_tokens=self.batches.seq_len)
        self.strategy = st.from_loss_config(self.cfg.loss)
        self._want = dict(hidden=self.cfg.loss.hidden > 0, attn=self.cfg.loss.attention > 0,
                          logits_from=self.batches.prefix_len if (self.cfg.loss.logit > 0) else None)
        return LoRAStudent(self.base.model, comp)

    @property
    def trainable(self):
        return nnx.All(nnx.Param, nnx.PathContains("compressor"))

    def loss(self, module, batch, rng, *, train: bool = True):
        model, comp = module.model, module.compressor
        tokens, lengths = batch["tokens"], batch["lengths"]
        want = dict(self._want)
        if not train:
            want["logits_from"] = self.batches.prefix_len
        remat = self.cfg.train.remat
        teacher = stop_gradient(forward_train(model, tokens, lengths, remat=False, **want))
        attention = compressed_attention(comp, self.batches.prefix_len, model.config.sliding_window,
                                         key=rng if train else None)
        student = forward_train(model, tokens, lengths, attention=attention, remat=remat and train, **want)
        loss, metrics = self.strategy.compute_loss(student, teacher, batch)
        if not train:
            metrics.update(fidelity(student, teacher, batch))
        return loss, metrics

    def export(self, module, run_dir) -> dict:
        path = pathlib.Path(run_dir) / "lora_compressor.npz"
        save_compressor(module.compressor, path, metadata=dict(model=self.cfg.model.name, steps=self.cfg.train.steps))
        return {"compressor_file": str(path)}


def fidelity(student, teacher, batch) -> dict:
    """Held-out logit fidelity at scored positions: KL(teacher || student) at T = 1, top-1 agreement,
    and both models' next-token NLL."""
    off = student.logits_from
    mask = batch["mask"][:, off:].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    ls = jax.nn.log_softmax(student.logits.astype(jnp.float32), -1)
    lt = jax.nn.log_softmax(teacher.logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    agree = (jnp.argmax(ls, -1) == jnp.argmax(lt, -1)).astype(jnp.float32)
    labels = batch["labels"][:, off:, None].astype(jnp.int32)
    nll_s = -jnp.take_along_axis(ls, labels, -1)[..., 0]
    nll_t = -jnp.take_along_axis(lt, labels, -1)[..., 0]
    return {"kl_t1": jnp.sum(kl * mask) / n, "top1_agreement": jnp.sum(agree * mask) / n,
            "student_nll": jnp.sum(nll_s * mask) / n, "teacher_nll": jnp.sum(nll_t * mask) / n}


# ---------------------------------------------------------------------------------------------- artifacts


def save_compressor(comp: LoRACompressor, path, *, metadata: dict | None = None) -> None:
    """Writes the compressor's parameters (npz) and its shape/hyper-parameters (a JSON sidecar)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {n: np.asarray(getattr(comp, n)[...]) for n in ("k_down", "k_up", "v_down", "v_up")}
    np.savez(path, **arrays)
    meta = dict(hidden_size=comp.hidden_size, rank=comp.rank, alpha=comp.alpha, dropout=comp.dropout_rate,
                num_kv_heads=comp.num_kv_heads, num_layers=comp.num_layers, metadata=dict(metadata or {}))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


def load_compressor(path) -> LoRACompressor:
    """A LoRACompressor with the parameters saved by `save_compressor` (plug in with `.as_policy()`)."""
    path = pathlib.Path(path)
    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(f"LoRA compressor files {str(path)!r} / {str(side)!r} not found")
    meta = json.loads(side.read_text())
    comp = LoRACompressor(int(meta["hidden_size"]), int(meta["rank"]), float(meta["alpha"]), float(meta["dropout"]),
                          num_kv_heads=int(meta["num_kv_heads"]), num_layers=int(meta["num_layers"]))
    with np.load(path) as z:
        for n in ("k_down", "k_up", "v_down", "v_up"):
            want = getattr(comp, n)[...].shape
            if z[n].shape != want:
                raise ValueError(f"{path}: {n} has shape {z[n].shape}, expected {want}")
            getattr(comp, n).set_value(jnp.asarray(z[n]))
    return comp


__all__ = ["LoRAStudent", "LoRATask", "compressed_attention", "fidelity", "load_compressor", "reconstruct",
           "save_compressor"]
