"""The `pikv` command: `info --json`, bad flag values (non-zero exit, message naming the flag), and
an end-to-end `generate --json` on SmolLM2 in a subprocess (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pikv_jax import cli


def _pikv(*args, timeout=300):
    """Runs `python -m pikv_jax.cli ARGS` (the console script's entry point) in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "pikv_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_info_json_lists_versions_devices_and_the_bundled_model():
    from pikv_jax.models.registry import bundled_model_path

    proc = _pikv("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    import jax

    assert info["versions"]["jax"] == jax.__version__
    assert info["versions"]["flax"] and info["versions"]["pikv-jax"]
    assert info["devices"] and all(isinstance(d, str) for d in info["devices"])
    assert info["backend"] == "cpu"
    path = info["bundled_model"]["smollm2"]
    assert path == bundled_model_path() and os.path.isfile(path) and path.endswith(".gguf")


@pytest.mark.parametrize("argv,named", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-2"], "--top-k"),
    (["--max-cache-tokens", "0"], "--max-cache-tokens"),
    (["--model", "/nonexistent"], "/nonexistent"),
    (["--mesh", "rows=2"], "rows"),          # unknown axis name
    (["--mesh", "data=64"], "64"),           # more devices than this machine has
    (["--mesh", "data=0"], "data"),
])
def test_bad_flag_values_exit_nonzero_naming_the_flag(capsys, argv, named):
    rc = cli.main(["generate", "--prompt", "hi", *argv])
    err = capsys.readouterr().err
    assert rc != 0
    assert named in err and "error" in err


def test_unparsable_flag_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "many"])
    assert e.value.code != 0
    assert "--max-new-tokens" in capsys.readouterr().err


def test_bad_flag_in_a_subprocess_exits_nonzero():
    proc = _pikv("generate", "--prompt", "hi", "--max-new-tokens", "0", timeout=120)
    assert proc.returncode != 0
    assert "--max-new-tokens" in proc.stderr
    assert "loading" not in proc.stderr  # rejected before the model load


@pytest.mark.slow
def test_generate_json_on_smollm2(reference, cli_generate_run):
    """`pikv generate --model smollm2 --prompt "The capital of France is" --max-new-tokens 8 --json`
    (started in the background at session start, see conftest)."""
    golden = reference["prompts"]["capital"]
    returncode, stdout, stderr = cli_generate_run
    assert returncode == 0, stderr[-2000:]
    assert golden["text"] == "The capital of France is"
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["token_ids"] == golden["greedy24_ids"][:8]
    assert out["text"] == " Paris.\n\nThe answer is:"
    assert golden["greedy24_text"].startswith(out["text"])
    assert out["prompt_tokens"] == [len(golden["input_ids"])]
    assert out["finish_reason"] == "max_tokens"
    stats = out["stats"]
    for key in ("cache_bytes", "full_cache_bytes", "prefill_tokens_per_s", "decode_ms_per_token"):
        assert stats[key] > 0, key
    # 30 layers x 3 KV heads x 64 dims x (K + V) x 2 bytes per cached token; 5 + 8 - 1 tokens cached
    assert stats["full_cache_bytes"] == (5 + 8 - 1) * 30 * 3 * 64 * 2 * 2
    assert stats["cache_bytes"] >= 2 * stats["full_cache_bytes"]  # float32 and padded capacity
    assert "[pikv]" in stderr  # progress goes to stderr, not into the JSON line
