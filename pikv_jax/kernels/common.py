"""What every kernel module shares: which implementation runs (`impl`), which Pallas backend and
interpret mode, compatibility shims across jax 0.10.2 / 0.11.2 / 0.12, logged fallbacks, and the
online softmax of the decode kernels (running max / sum per block, partials merged by log-sum-exp).

Implementation choice (`impl`):
- "xla": the pure-jnp reference path.
- "pallas": the Pallas kernel; on CPU it runs in interpret mode automatically. A shape or dtype the
  kernel does not support raises `KernelUnsupported` naming the constraint.
- "auto" (default): Pallas on TPU; XLA on CPU; XLA on GPU unless PIKV_PALLAS_GPU=1, because the GPU
  kernels were written and interpret-tested without a GPU and have not yet been checked on one (run
  scripts/bench_kernels.py on the device machine, then flip the default). Under "auto" an
  unsupported combination falls back to XLA and logs the reason once.

The setting is read when a function is traced: set it (`set_attention_impl` or the environment
variable PIKV_ATTENTION_IMPL) before the generation loop compiles.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pikv_jax.attention.reference import NEG_INF, reduce_group

log = logging.getLogger("pikv_jax.kernels")

IMPLS = ("xla", "pallas", "auto")
BACKENDS = ("triton", "mosaic_tpu")
ENV_IMPL = "PIKV_ATTENTION_IMPL"
ENV_PALLAS_GPU = "PIKV_PALLAS_GPU"

_impl_setting: str | None = None
_logged: set[str] = set()


class KernelUnsupported(NotImplementedError):
    """A Pallas kernel cannot run this shape / dtype combination (the message says which rule)."""


def check_impl(impl: str) -> str:
    """`impl` itself when it is one of IMPLS, else ValueError naming the allowed values."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; allowed: {IMPLS}")
    return impl


def set_attention_impl(impl: str | None) -> None:
    """Process-wide default for `impl=None` ("xla" | "pallas" | "auto"; None = back to the environment)."""
    global _impl_setting
    _impl_setting = None if impl is None else check_impl(impl)


def get_attention_impl() -> str:
    """The requested implementation: set_attention_impl, else $PIKV_ATTENTION_IMPL, else "auto"."""
    if _impl_setting is not None:
        return _impl_setting
    return check_impl(os.environ.get(ENV_IMPL, "auto").strip().lower() or "auto")


def platform() -> str:
    """"cpu", "gpu" or "tpu" for the default device."""
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def resolve_impl(impl: str | None = None) -> str:
    """-> "xla" or "pallas" for the requested `impl` on this platform (see module docstring)."""
    impl = get_attention_impl() if impl is None else check_impl(impl)
    if impl != "auto":
        return impl
    p = platform()
    if p == "tpu":
        return "pallas"
    if p == "gpu" and os.environ.get(ENV_PALLAS_GPU, "") == "1":
        return "pallas"
    return "xla"


def default_backend() -> str:
    """Pallas backend for this platform: Mosaic on TPU, Triton on GPU and (interpreted) on CPU."""
    return "mosaic_tpu" if platform() == "tpu" else "triton"


def resolve_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    """(backend, interpret): interpret defaults to True exactly when no accelerator runs the kernel."""
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {BACKENDS}")
    if interpret is None:
        native = {"triton": "gpu", "mosaic_tpu": "tpu"}[backend]
        interpret = platform() != native
    return backend, bool(interpret)


def interpret_arg(backend: str, interpret: bool):
    """The `interpret=` value for pallas_call: TPU kernels use the TPU interpreter (which checks
    Mosaic semantics: SMEM scalar prefetch, VMEM scratch, grid order); Triton kernels the generic one."""
    if not interpret:
        return False
    if backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu  # lazy: platform-specific Pallas backend

        return pltpu.InterpretParams()
    return True


def gpu_compiler_params(num_warps: int | None, num_stages: int | None):
    """Triton compiler parameters (the class was renamed across jax versions)."""
    from jax.experimental.pallas import triton as plgpu  # lazy: platform-specific Pallas backend

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics, vmem_limit_bytes: int | None = None):
    """Mosaic compiler parameters (the class was renamed across jax versions)."""
    from jax.experimental.pallas import tpu as pltpu  # lazy: platform-specific Pallas backend

    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    kw = {} if vmem_limit_bytes is None else dict(vmem_limit_bytes=vmem_limit_bytes)
    return cls(dimension_semantics=tuple(dimension_semantics), **kw)


def compiler_params(backend: str, interpret: bool, *, num_warps=None, num_stages=None, dimension_semantics=None):
    """Compiler parameters of `backend`: Triton takes warps / stages, Mosaic the grid semantics."""
    if backend == "triton":
        return gpu_compiler_params(num_warps, num_stages)
    return tpu_compiler_params(dimension_semantics)


def gpu_core_count(default: int = 132) -> int:
    """Streaming multiprocessors of the first GPU (132 on H100 SXM / H200), for split-K sizing."""
    try:
        d = jax.devices()[0]
        n = getattr(d, "core_count", None)
        return int(n) if n else default
    except Exception:  # noqa: BLE001 - any backend without the attribute
        return default


def is_pow2(n: int) -> bool:
    """True for 1, 2, 4, ... (tile sizes Triton accepts)."""
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a, b):
    """ceil(a / b) for Python ints or integer arrays (traced values too)."""
    return -(-a // b)


def log_once(msg: str) -> None:
    """Logs `msg` as a warning the first time only (fallbacks are decided at every trace)."""
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


def choose(impl: str | None, what: str, reason: str | None) -> str:
    """Final "xla" / "pallas" for one call: `reason` is None when the kernel supports the inputs,
    else why not. An explicit impl="pallas" raises on an unsupported input; "auto" falls back."""
    requested = get_attention_impl() if impl is None else check_impl(impl)
    resolved = resolve_impl(requested)
    if resolved == "xla" or reason is None:
        return resolved
    if requested == "pallas":
        raise KernelUnsupported(f"{what}: the Pallas kernel does not support this input ({reason}); "
                                "use impl='xla' or 'auto'")
    log_once(f"{what}: falling back to XLA ({reason})")
    return "xla"


# ---------------------------------------------------------------------------------------------
# Online softmax (flash decoding) shared by every decode kernel: layout helpers, the running
# statistics of one block, the kernel prologue / epilogue, and the log-sum-exp merge of partials.

GPU_MIN_ROWS = 16  # tensor-core dot needs M >= 16: query groups are padded to this many rows
TPU_MIN_ROWS = 8  # sublanes
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Partials(NamedTuple):
    """One segment of slots, attended by one kernel call.

    o: f32[B, Hkv, S, G', D] unnormalised partial outputs (G' >= G rows, the first G real);
    m, l: f32[B, Hkv, S, G'] running max and sum per split;
    logits: f32[B, Hkv, G', N] scaled logits (-inf where invisible; slots >= limit unspecified);
    limit: i32[B, Hkv]: slots at or past it are treated as empty.
    """

    o: jax.Array
    m: jax.Array
    l: jax.Array
    logits: jax.Array
    limit: jax.Array


def slot_limit(pos) -> jax.Array:
    """i32[B, Hkv]: one past the last used slot (0 for an empty row); slots after it are skipped."""
    c = pos.shape[-1]
    return jnp.max(jnp.where(pos >= 0, jnp.arange(1, c + 1, dtype=jnp.int32), 0), axis=-1)


def q_positions(q_pos, batch: int, num_kv_heads: int) -> jax.Array:
    """q_pos i32[B] or i32[B, Hkv] -> i32[B, Hkv]."""
    q_pos = jnp.asarray(q_pos, jnp.int32)
    if q_pos.ndim == 1:
        q_pos = q_pos[:, None]
    return jnp.broadcast_to(q_pos, (batch, num_kv_heads))


def group_query(q, num_kv_heads: int, rows: int):
    """q [B, H, D] -> [B, Hkv, rows, D] (the group padded with zero rows)."""
    b, h, d = q.shape
    g = h // num_kv_heads
    qg = q.reshape(b, num_kv_heads, g, d)
    return qg if rows == g else jnp.pad(qg, ((0, 0), (0, 0), (0, rows - g), (0, 0)))


def online_init(rows: int, width: int):
    """(acc f32[rows, width] = 0, m f32[rows, 1] = NEG_INF, l f32[rows, 1] = 0): nothing seen yet."""
    f32 = jnp.float32
    return jnp.zeros((rows, width), f32), jnp.full((rows, 1), NEG_INF, f32), jnp.zeros((rows, 1), f32)


def online_update(s, m_prev, l_prev):
    """Flash-attention running statistics for a block of scaled logits s [R, N] (-inf = masked);
    m_prev, l_prev: [R, 1]. m starts at NEG_INF (finite), so rows with nothing visible keep
    m = NEG_INF, alpha = 1, p = 0. Returns (p [R, N], alpha [R, 1], m_new [R, 1], l_new [R, 1])."""
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    return p, alpha, m_new, alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)


def gpu_online_loop(n_blocks, body, o_ref, m_ref, l_ref) -> None:
    """Triton program: runs `body(i, (acc, m, l))` over n_blocks blocks from `online_init` and
    writes this program's partial: o_ref [Gp, D], m_ref and l_ref [Gp]."""
    gp, d = o_ref.shape
    acc, m, l = jax.lax.fori_loop(0, n_blocks, body, online_init(gp, d))
    o_ref[...] = acc
    m_ref[...] = m.reshape(gp)
    l_ref[...] = l.reshape(gp)


def tpu_online_begin(first, acc_sc, m_sc, l_sc) -> None:
    """Mosaic program: resets the running statistics held in VMEM scratch on the first grid step."""

    @pl.when(first)
    def _init():
        acc_sc[...] = jnp.zeros_like(acc_sc)
        m_sc[...] = jnp.full_like(m_sc, NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)


def tpu_online_end(last, acc_sc, m_sc, l_sc, o_ref, m_ref, l_ref) -> None:
    """Mosaic program: writes the running statistics out on the last grid step."""

    @pl.when(last)
    def _done():
        o_ref[...] = acc_sc[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]


def tpu_skip_logits(active, lg_ref) -> None:
    """Mosaic program: a block past the row's last used slot was not computed: its logits are -inf."""

    @pl.when(jnp.logical_not(active))
    def _skip():
        lg_ref[...] = jnp.full(lg_ref.shape, -jnp.inf, jnp.float32)


def tpu_block_in_range(j, block_k: int, capacity: int):
    """Which slots of block j lie below `capacity` (the last block may be padded with unspecified
    data): as a row bool[1, block_k] (for logits) and as a column bool[block_k, 1] (for values)."""
    first = j * block_k
    row = first + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < capacity
    col = first + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < capacity
    return row, col


def used_block(j, n_used):
    """Block index to fetch at grid step j: j, or the last used block once past it (the same index
    as the previous step, so the pipeline skips the copy); 0 for a row with no used block."""
    return jnp.maximum(jnp.minimum(j, n_used - 1), 0)


def tpu_partials(o, m, l, logits, limit) -> Partials:
    """Partials from a Mosaic kernel's one split: o [B, Hkv, Gp, D], m and l lane-broadcast
    [B, Hkv, Gp, 128]."""
    return Partials(o[:, :, None], m[:, :, None, :, 0], l[:, :, None, :, 0], logits, limit)


def finish(parts: list[Partials], *, group: int, group_reduce: str, out_dtype):
    """Merges the partials of one or more segments (log-sum-exp) -> (out [B, Hkv * G, D], mass
    f32[B, Hkv, sum of segment lengths]) exactly as the reference defines them: rows with nothing
    visible give out = 0 and mass = 0."""
    m = jnp.concatenate([p.m[..., :group] for p in parts], axis=2)  # [B, Hkv, S, G]
    l = jnp.concatenate([p.l[..., :group] for p in parts], axis=2)
    o = jnp.concatenate([p.o[..., :group, :] for p in parts], axis=2)  # [B, Hkv, S, G, D]
    big_m = jnp.max(m, axis=2)  # [B, Hkv, G]
    w = jnp.exp(m - big_m[:, :, None])
    big_l = jnp.sum(l * w, axis=2)
    ok = big_l > 0
    inv_l = jnp.where(ok, 1.0 / jnp.where(ok, big_l, 1.0), 0.0)
    out = jnp.sum(o * w[..., None], axis=2) * inv_l[..., None]  # [B, Hkv, G, D]
    b, hk, g, d = out.shape
    masses = []
    for p in parts:
        n = p.logits.shape[-1]
        probs = jnp.exp(p.logits[:, :, :group] - big_m[..., None]) * inv_l[..., None]  # [B, Hkv, G, N]
        in_range = jnp.arange(n, dtype=jnp.int32)[None, None, None, :] < p.limit[:, :, None, None]
        masses.append(reduce_group(jnp.where(in_range, probs, 0.0), group_reduce, axis=2))
    mass = masses[0] if len(masses) == 1 else jnp.concatenate(masses, axis=-1)
    return out.reshape(b, hk * g, d).astype(out_dtype), mass
