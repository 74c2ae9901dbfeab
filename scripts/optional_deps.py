"""Stubs for optional dependencies the benchmark scripts never use, imported before pikv_jax.

`import pikv_jax` pulls in the tokenizer, which imports Hugging Face `tokenizers`; the benchmarks use
random token ids and need only jax / flax / numpy, so an optional dependency that is not installed
(the device machine has no gguf) is replaced by a stub that fails only when used. This lives beside
the scripts, not in pikv_jax, because it must run before the package is imported.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def stub_missing_optional_deps(names=("tokenizers", "gguf", "safetensors")) -> list[str]:
    """Installs a stub module for each of `names` that is neither imported nor installed; returns
    the stubbed names (recorded in the benchmark's JSON)."""
    stubbed = []
    for name in names:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        mod = types.ModuleType(name)

        def missing(attr, _name=name):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def fail(*a, **k):
                raise ImportError(f"{_name} is not installed (stubbed by the benchmark script)")
            return type(attr, (), {"__init__": fail, "from_file": staticmethod(fail), "from_str": staticmethod(fail)})

        mod.__getattr__ = missing
        sys.modules[name] = mod
        stubbed.append(name)
    return stubbed
