"""Evaluation of cache policies: passkey / needle retrieval, RULER-style synthetic tasks, perplexity
under compression, logit fidelity against the full cache, and decode speed; JSON + PNG + markdown
reports.

    from pikv_jax.eval import EvalConfig, run_eval, smoke_config
    run_eval(smoke_config(out="/tmp/eval"))

Modules: methods (spec strings -> policies), passkey, ruler, perplexity, fidelity, report, runner, cli.
"""

from pikv_jax.eval import compress_methods  # noqa: F401 - registers the compression transforms
from pikv_jax.eval.fidelity import kl_divergence, logit_fidelity, top1_agreement
from pikv_jax.eval.methods import Method, parse_method, parse_methods, register_method
from pikv_jax.eval.passkey import PasskeyCase, build_case, build_cases, run_passkey, score_answer
from pikv_jax.eval.perplexity import eviction_perplexity, prefix_perplexity
from pikv_jax.eval.ruler import RulerCase, run_ruler, string_match_all
from pikv_jax.eval.runner import EvalConfig, run_eval, smoke_config

__all__ = ["EvalConfig", "Method", "PasskeyCase", "RulerCase", "build_case", "build_cases", "eviction_perplexity",
           "kl_divergence", "logit_fidelity", "parse_method", "parse_methods", "prefix_perplexity",
           "register_method", "run_eval", "run_passkey", "run_ruler", "score_answer", "smoke_config",
           "string_match_all", "top1_agreement"]
