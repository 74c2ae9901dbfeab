"""Shared fixtures. The real model (SmolLM2 from the bundled GGUF) loads once per session.

Shape checks: the jaxtyping annotations of the modules in `TYPECHECKED` are enforced at test time
by jaxtyping's import hook with beartype as the checker (set PIKV_TYPECHECK=0 to switch it off).
The hook must be installed before any of these modules is first imported, hence here, at the top
of the root conftest, which pytest imports before any test module.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

# Modules whose annotated functions and dataclasses are checked: the cache pytrees and their
# primitive operations, the generation state, and the kernels (annotated from the start). Not the
# whole package: elsewhere annotations are documentation only (see tests/test_shape_checks.py).
TYPECHECKED = (
    "pikv_jax.cache.state",
    "pikv_jax.cache.ops",
    "pikv_jax.cache.pooled",
    "pikv_jax.cache.quantized",
    "pikv_jax.runtime.generate",
    "pikv_jax.kernels",
)
TYPECHECK = os.environ.get("PIKV_TYPECHECK", "1") != "0"

if TYPECHECK:
    import sys

    _early = sorted(m for m in sys.modules if m.startswith(TYPECHECKED))
    if _early:  # imported before the hook (e.g. by a plugin): their annotations would go unchecked
        raise RuntimeError(f"modules imported before the jaxtyping import hook: {_early}")
    import jaxtyping

    jaxtyping.install_import_hook(list(os.environ.get("PIKV_TYPECHECK_MODULES", ",".join(TYPECHECKED)).split(",")),
                                  "beartype.beartype")

# A copy of ../shared/reference/smollm2_transformers.json (transformers 5.2.0 on the same GGUF weights),
# kept in the repository so that a clean clone anywhere can run the golden tests.
REFERENCE = pathlib.Path(__file__).resolve().parent / "golden" / "smollm2_transformers.json"


def _reference_path() -> pathlib.Path:
    env = os.environ.get("PIKV_REFERENCE")
    return pathlib.Path(env) if env else REFERENCE


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's compiled-program caches after each test module. One process runs thousands of
    XLA compiles and each live executable keeps its JIT code mapped. A full run once segfaulted
    inside the XLA CPU compiler near its end (cause not identified); with this, a full run peaked at
    18k memory maps and 4.2 GB RSS and passed."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def reference():
    path = _reference_path()
    if not path.exists():
        pytest.fail(f"golden reference file missing: {path} (set PIKV_REFERENCE)")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def smollm2():
    """PiKVModel for the bundled SmolLM2 (float32, CPU)."""
    from pikv_jax.api import PiKVModel

    return PiKVModel.from_pretrained("smollm2")


@pytest.fixture(scope="session")
def smollm2_weights():
    """(config, HF-named float32 weights, tokenizer) straight from the GGUF."""
    from pikv_jax.models.gguf_loader import load_gguf
    from pikv_jax.models.registry import bundled_model_path

    return load_gguf(bundled_model_path("smollm2"))


# ---------------------------------------------------------------------------------------------
# Step-by-step cached decoding vs the uncached forward, shared by the tiny-config and SmolLM2 tests.
# One jitted function per (graphdef, shapes): prefill, then `n_steps` greedy decode steps under a
# `lax.scan`, returning the logits of every step so that each can be compared with `forward_full`.


def _stepwise_impl(graphdef, n_steps, params, tokens, lengths, cache):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pikv_jax.cache.policies.base import CachePolicy
    from pikv_jax.runtime import forward

    model = nnx.merge(graphdef, params)
    policy = CachePolicy()
    logits0, cache = forward.prefill(model, tokens, lengths, cache, policy)
    active = jnp.ones(tokens.shape[:1], bool)

    def step(carry, _):
        cache, last_logits = carry
        tok = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)
        logits, cache, wrote = forward.decode_step(model, cache, tok, active, policy)
        return (cache, logits), (tok, logits, wrote)

    (cache, _), (toks, logits, wrote) = jax.lax.scan(step, (cache, logits0), None, length=n_steps)
    all_logits = jnp.concatenate([logits0[:, None], jnp.swapaxes(logits, 0, 1)], axis=1)
    return all_logits, jnp.swapaxes(toks, 0, 1), jnp.swapaxes(wrote, 0, 1), cache.length


def _full_impl(graphdef, params, tokens, lengths):
    from flax import nnx

    from pikv_jax.runtime import forward

    return forward.forward_full(nnx.merge(graphdef, params), tokens, lengths)


_JITTED: dict = {}


def _jitted(name):
    import jax

    if name not in _JITTED:
        _JITTED["stepwise"] = jax.jit(_stepwise_impl, static_argnums=(0, 1))
        _JITTED["full"] = jax.jit(_full_impl, static_argnums=0)
    return _JITTED[name]


def run_stepwise(graphdef, params, prompts, n_steps, *, pad_to=None, pad_fill=None, cache_dtype=None):
    """Cached greedy decoding of right-padded `prompts` (lists of ids).

    Returns numpy (logits f32[B, n_steps + 1, V]: prefill's logits then each decode step's;
    generated ids i32[B, n_steps]: argmax of the previous logits, fed at each step; wrote bool[B, n];
    final cache lengths i32[B]). `pad_fill`: a callable (shape) -> ids used as padding content.
    """
    import jax.numpy as jnp
    import numpy as np

    from pikv_jax.cache.state import init_cache

    s = pad_to or max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), s), np.int32) if pad_fill is None else np.asarray(
        pad_fill((len(prompts), s)), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    cfg = graphdef_config(graphdef, params)
    cache = init_cache(len(prompts), s + n_steps, num_layers=cfg.num_hidden_layers,
                       num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                       dtype=cache_dtype or jnp.float32)
    out = _jitted("stepwise")(graphdef, n_steps, params, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    return tuple(np.asarray(x) for x in out)


def run_full_on_continuations(graphdef, params, prompts, generated, *, pad_to=None):
    """Uncached logits at the positions the cached path produced logits for.

    Feeds prompt_b + generated_b[:-1]... in one `forward_full` and returns f32[B, n + 1, V] where
    entry i is the logits after prompt_b + generated_b[:i] (the reference for cached step i).
    """
    import jax.numpy as jnp
    import numpy as np

    n = generated.shape[1]
    seqs = [list(p) + [int(t) for t in g] for p, g in zip(prompts, generated)]
    s = pad_to or max(len(x) for x in seqs)
    tokens = np.zeros((len(seqs), s), np.int32)
    for i, x in enumerate(seqs):
        tokens[i, : len(x)] = x
    lengths = np.array([len(x) for x in seqs], np.int32)
    logits = np.asarray(_jitted("full")(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths)))
    return np.stack([logits[b, len(p) - 1: len(p) + n] for b, p in enumerate(prompts)])


def graphdef_config(graphdef, params):
    from flax import nnx

    return nnx.merge(graphdef, params).config


@pytest.fixture(scope="session")
def stepwise():
    """(run_stepwise, run_full_on_continuations) helpers; their jitted functions are shared."""
    return run_stepwise, run_full_on_continuations


@pytest.fixture(scope="session")
def smollm2_stepwise(smollm2, reference):
    """SmolLM2 on three golden prompts of different lengths (capital, story, chat) as one padded
    batch: cached logits of prefill + 6 greedy decode steps, and the uncached reference logits."""
    names = ["capital", "story", "chat"]
    prompts = [reference["prompts"][n]["input_ids"] for n in names]
    gd, params = smollm2.graphdef, smollm2.params
    logits, gen, wrote, length = run_stepwise(gd, params, prompts, 6, pad_to=40)
    full = run_full_on_continuations(gd, params, prompts, gen, pad_to=48)
    return dict(names=names, prompts=prompts, logits=logits, generated=gen, wrote=wrote, length=length,
                full=full)


TINY_PROMPT_LENS = (3, 8, 11)


@pytest.fixture(scope="session")
def tiny_lm():
    """A PiKVModel over a tiny random Llama (no tokenizer) whose greedy output is varied, with
    three prompts of different lengths. Shared so that compiled generation is reused across files."""
    import numpy as np
    import numpy_reference

    from pikv_jax.api import PiKVModel
    from pikv_jax.config import tiny_config
    from pikv_jax.models.weights import build_model

    cfg = tiny_config("llama")
    model = PiKVModel(build_model(cfg, numpy_reference.random_weights(cfg.to_hf_dict(), seed=7)), None, cfg)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in TINY_PROMPT_LENS]
    return model, prompts


# ---------------------------------------------------------------------------------------------
# The slow end-to-end CLI run (tests/test_cli.py) loads SmolLM2 and compiles in a fresh process.
# When that test is selected it starts in the background as the session begins, so its load and
# compilation overlap with other tests; the test then waits for it and checks its output.

CLI_GENERATE_TEST = "test_cli.py::test_generate_json_on_smollm2"
CLI_GENERATE_ARGS = ("generate", "--model", "smollm2", "--prompt", "The capital of France is",
                     "--max-new-tokens", "8", "--json")
_BACKGROUND: dict = {}


def start_cli(args):
    """`python -m pikv_jax.cli ARGS` in a subprocess; output goes to temporary files (no pipe stalls)."""
    import subprocess
    import sys
    import tempfile

    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "pikv_jax.cli", *args], stdout=out, stderr=err, text=True,
                            env=env)
    return proc, out, err


def finish_cli(started, timeout=600):
    """-> (returncode, stdout, stderr) of a process from `start_cli`."""
    proc, out, err = started
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read()


@pytest.fixture(scope="session", autouse=True)
def _cli_generate_in_background(request):
    if any(item.nodeid.endswith(CLI_GENERATE_TEST) for item in request.session.items):
        _BACKGROUND["cli_generate"] = start_cli(CLI_GENERATE_ARGS)
    yield
    started = _BACKGROUND.pop("cli_generate", None)
    if started is not None and started[0].poll() is None:
        started[0].kill()
        started[0].wait()


@pytest.fixture
def cli_generate_run():
    """(returncode, stdout, stderr) of `pikv generate CLI_GENERATE_ARGS`, started early when possible."""
    started = _BACKGROUND.pop("cli_generate", None) or start_cli(CLI_GENERATE_ARGS)
    return finish_cli(started)


def pytest_collection_modifyitems(session, config, items):
    """Runs the background CLI test last, so the rest of the session overlaps with its subprocess."""
    last = [item for item in items if item.nodeid.endswith(CLI_GENERATE_TEST)]
    if last:
        items[:] = [item for item in items if item not in last] + last
