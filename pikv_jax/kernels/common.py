"""What every kernel module shares: which implementation runs (`impl`), which Pallas backend and
interpret mode, compatibility shims across jax 0.10.2 / 0.11.2 / 0.12, and logged fallbacks.

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

import jax

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
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return True


def gpu_compiler_params(num_warps: int | None, num_stages: int | None):
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics, vmem_limit_bytes: int | None = None):
    from jax.experimental.pallas import tpu as pltpu

    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    kw = {} if vmem_limit_bytes is None else dict(vmem_limit_bytes=vmem_limit_bytes)
    return cls(dimension_semantics=tuple(dimension_semantics), **kw)


def compiler_params(backend: str, interpret: bool, *, num_warps=None, num_stages=None, dimension_semantics=None):
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
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def log_once(msg: str) -> None:
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
