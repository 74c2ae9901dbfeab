"""Every kernel lowers for real hardware without that hardware: jit-traced under an abstract
NVIDIA H100 (Pallas Triton -> Triton IR) and an abstract TPU v5e (Pallas Mosaic -> Mosaic IR) at the
headline shapes (B = 8, H = 32, Hkv = 8, D = 128, 32k slots), and the resulting IR verifies. This
catches unsupported primitives, non-power-of-two Triton tensors and Mosaic layout rules on CPU; what
it cannot check is the device compiler after that (PTX / libtpu) and speed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pikv_jax.cache.quantized import init_quantized_layer
from pikv_jax.kernels import decode_attention as da
from pikv_jax.kernels import quant_pack as qp
from pikv_jax.kernels import quantized_attention as qa
from pikv_jax.kernels import quest as kq

B, H, HKV, C, D = 8, 32, 8, 32768, 128
S = jax.ShapeDtypeStruct
BF = jnp.bfloat16


def _abstract_mesh(kind: str, platform: str):
    try:  # lazy: only newer jax has abstract devices; older ones skip below
        from jax.sharding import AbstractDevice, AbstractMesh, AxisType

        dev = AbstractDevice(device_kind=kind, num_cores=132 if platform == "gpu" else 1, platform=platform)
        return AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
    except (ImportError, TypeError) as e:  # older jax: no abstract devices to lower for
        pytest.skip(f"this jax cannot lower for an abstract {kind}: {e}")


def _cases(backend):
    kw = dict(backend=backend, interpret=False)
    sd = jnp.float16 if backend == "triton" else jnp.bfloat16
    cases = {
        "decode": (functools.partial(da.decode_attention, **kw),
                   (S((B, H, D), BF), S((B, HKV, C, D), BF), S((B, HKV, C, D), BF), S((B, HKV, C), jnp.int32),
                    S((B,), jnp.int32))),
        "paged": (functools.partial(da.paged_decode_attention, page_size=16, **kw),
                  (S((B, H, D), BF), S((B, HKV, C, D), BF), S((B, HKV, C, D), BF), S((B, HKV, C), jnp.int32),
                   S((B,), jnp.int32), S((B, HKV, 64), jnp.int32))),
        "select": (functools.partial(kq.select_pages, k=64, **kw),
                   (S((B, H, D), BF), S((B, HKV, 2052, D), jnp.float32), S((B, HKV, 2052, D), jnp.float32),
                    S((B, HKV, 2052), bool), S((B, HKV), jnp.int32))),
    }
    for bits in (8, 4, 2):
        cache = jax.eval_shape(lambda bits=bits: init_quantized_layer(B, HKV, C, D, BF, bits=bits, group_size=32,
                                                                      residual_length=128, scale_dtype=sd))
        arrays = (cache.kq, cache.k_scale, cache.k_min, cache.vq, cache.v_scale, cache.v_min, cache.k_res,
                  cache.v_res, cache.pos)
        cases[f"kivi_int{bits}"] = (functools.partial(qa.quantized_decode_attention, bits=bits, group_size=32, **kw),
                                    (S((B, H, D), BF), *arrays, S((B,), jnp.int32)))
        cases[f"pack_int{bits}"] = (functools.partial(qp.quantize_kv, bits=bits, group_size=32, scale_dtype=sd, **kw),
                                    (S((B, HKV, 256, D), BF), S((B, HKV, 256, D), BF)))
    return cases


@pytest.mark.parametrize("name", ["decode", "paged", "select", "kivi_int8", "kivi_int4", "kivi_int2", "pack_int8",
                                  "pack_int4", "pack_int2"])
def test_triton_ir_for_h100(name, monkeypatch):
    from jax._src.pallas.triton import lowering as triton_lowering  # lazy: private, Triton-backend-specific

    modules = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
    fn, args = _cases("triton")[name]
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H100", "gpu")):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and modules
    for op in modules:
        assert op.verify()
    if name == "decode":  # the block loop is one scf.for (Triton pipelines it), two tensor-core dots
        asm = modules[0].get_asm()
        assert asm.count("scf.for") == 1 and asm.count("tt.dot") == 2
        assert "tensor<16x128xbf16> * tensor<128x64xbf16>" in asm  # [Gp, D] x [D, block_k]


@pytest.mark.parametrize("name", ["decode", "paged", "select", "kivi_int8", "kivi_int4", "kivi_int2", "pack_int8",
                                  "pack_int4", "pack_int2"])
def test_mosaic_ir_for_tpu(name):
    fn, args = _cases("mosaic_tpu")[name]
    with jax.sharding.use_abstract_mesh(_abstract_mesh("TPU v5 lite", "tpu")):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
