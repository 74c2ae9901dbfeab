"""Method specs for evaluation: short strings that name a cache policy (and, later, compressions).

Grammar (whitespace ignored, case-insensitive names):

    spec      := component ("+" component)*
    component := name ["(" key=value, ... ")"] ["@" budget]
    budget    := ratio in (0, 1] ("0.25") | percent ("25%") | tokens ("256t")

A bare first option names the scorer a combinator wraps: "adakv(expected_attention)@0.25".

Examples: "full", "h2o@0.25", "snapkv@50%", "streaming_llm@256t", "h2o(recent_ratio=0.3)@0.25",
"snapkv+h2o@0.25" (Composite: SnapKV selects at prefill, H2O evicts at decode, one shared budget).

Each component name is looked up in a registry of builders. Eviction policies (every name in
`pikv_jax.cache.policies.POLICIES`, looked up when a spec is parsed, so newly registered policies
work without touching this file) have role "policy"; at most two of them may appear and two are
composed as prefill + decode. A future compression (e.g. "int4") registers a builder with role
"transform": it receives the policy built so far and returns a new one, so "h2o@0.25+int4" needs
no parser change:

    register_method("int4", lambda policy, budget, options, ctx: Quantized(policy, bits=4),
                    role="transform")

Builders receive a `BuildContext` (num_layers, context_len, model) for methods whose policy depends
on the model or the prompt length: Quest's attention budget is tokens (a ratio becomes
ratio x context_len), DuoAttention's head pattern is calibrated on the model with a retrieval
fraction chosen so its memory matches the ratio at context_len.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Callable

from pikv_jax.cache.policies import POLICIES, Composite, make_policy
from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.cache.policies.duo_attention import DuoAttention
from pikv_jax.calibrate import duo as dc


@dataclasses.dataclass(frozen=True)
class Budget:
    """ratio in (0, 1] or tokens >= 1 (exactly one is set)."""

    ratio: float | None = None
    tokens: int | None = None

    def as_options(self) -> dict:
        return {"budget_ratio": self.ratio} if self.ratio is not None else {"budget_tokens": self.tokens}

    @property
    def label(self) -> str:
        return f"{self.tokens}t" if self.tokens is not None else f"{self.ratio:g}"


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a builder may need besides the spec: model depth, the prompt length the method will
    compress (for ratio budgets of token-budgeted methods), and the model (calibration)."""

    num_layers: int | None = None
    context_len: int | None = None
    model: Any = None


@dataclasses.dataclass(frozen=True)
class MethodBuilder:
    """role "policy": build(budget | None, options, ctx: BuildContext) -> CachePolicy.
    role "transform": build(policy, budget | None, options, ctx: BuildContext) -> CachePolicy.
    needs_budget: the method is meaningless without one (every eviction policy except full)."""

    name: str
    role: str
    build: Callable[..., CachePolicy]
    needs_budget: bool = True
    takes_budget: bool = True


_REGISTRY: dict[str, MethodBuilder] = {}


def register_method(name: str, build: Callable[..., CachePolicy], *, role: str = "policy",
                    needs_budget: bool = True, takes_budget: bool = True) -> None:
    """Adds (or replaces) a method builder; see the module docstring for the two roles."""
    if role not in ("policy", "transform"):
        raise ValueError(f"role={role!r}; allowed: policy, transform")
    _REGISTRY[_norm(name)] = MethodBuilder(_norm(name), role, build, needs_budget, takes_budget)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _policy_builder(name: str) -> MethodBuilder:
    def build(budget, options, ctx):
        opts = dict(options)
        if budget is not None:
            opts.update(budget.as_options())
        return make_policy(name, num_layers=ctx.num_layers, **opts)

    is_full = name == "full"
    return MethodBuilder(name, "policy", build, needs_budget=not is_full, takes_budget=not is_full)


ALIASES = {"none": "full", "streamingllm": "streaming_llm", "streaming": "streaming_llm"}


def lookup(name: str) -> MethodBuilder:
    key = _norm(name)
    key = ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in POLICIES:
        return _policy_builder(key)
    raise ValueError(f"unknown method {name!r}; allowed: {', '.join(available_methods())}")


def available_methods() -> list[str]:
    return sorted(set(POLICIES) | set(_REGISTRY))


_COMPONENT = re.compile(r"^(?P<name>[a-z0-9_\-]+)(?:\((?P<opts>.*)\))?(?:@(?P<budget>[^@()]+))?$", re.I)
_SCORER = re.compile(r"^(?P<name>[a-z0-9_\-]+)(?:\((?P<opts>[^()]*)\))?$", re.I)


def parse_budget(text: str) -> Budget:
    """"0.25" -> ratio, "25%" -> ratio, "256t" -> tokens. Ratios must lie in (0, 1]."""
    t = text.strip().lower()
    try:
        if t.endswith("t"):
            n = int(t[:-1])
            if n < 1:
                raise ValueError
            return Budget(tokens=n)
        r = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"budget {text!r} is not a ratio in (0, 1] (0.25), a percentage (25%) "
                         f"or a token count (256t)") from None
    if not 0.0 < r <= 1.0:
        raise ValueError(f"budget {text!r} is outside (0, 1]: give a ratio such as 0.25, or tokens such as 256t")
    return Budget(ratio=r)


def _takes_scorer(builder: MethodBuilder) -> bool:
    """The builder makes a policy that wraps a scorer (AdaKV): a bare first option names it."""
    return builder.role == "policy" and builder.name in POLICIES and "scorer" in {
        f.name for f in dataclasses.fields(POLICIES[builder.name])}


def _parse_options(text: str | None, spec: str, *, takes_scorer: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not text or not text.strip():
        return out
    for i, item in enumerate(_split_top(text)):
        if "=" not in item.partition("(")[0] and i == 0 and takes_scorer:
            # adakv(expected_attention) or adakv(kvzip(budget_scope=global)): the scorer it wraps
            m = _SCORER.match(item.strip())
            if not m:
                raise ValueError(f"scorer {item.strip()!r} in {spec!r} must look like name or name(key=value,...)")
            opts = _parse_options(m["opts"], spec)
            out["scorer"] = m["name"].lower() if not opts else (m["name"].lower(), tuple(sorted(opts.items())))
            continue
        if "=" not in item:
            raise ValueError(f"option {item.strip()!r} in {spec!r} must look like key=value")
        k, v = (s.strip() for s in item.split("=", 1))
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v  # bare words: mean, max, ...
    return out


@dataclasses.dataclass(frozen=True)
class Method:
    """A parsed spec: `label` (canonical text), the built `policy`, and its `budget` (None = full)."""

    spec: str
    label: str
    policy: CachePolicy
    budget: Budget | None
    components: tuple[str, ...]

    @property
    def is_full(self) -> bool:
        return self.budget is None and self.components == ("full",)


def _parse_parts(spec: str):
    """The syntax of a spec, checked without building anything: (parts, budget, policies, transforms)
    with parts [(builder, options, budget)]."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("method spec is empty; e.g. full, h2o@0.25, snapkv+h2o@0.5, streaming_llm@256t")
    raw = re.sub(r"\s+", "", spec)
    parts = []
    for comp in raw.split("+"):
        m = _COMPONENT.match(comp)
        if not m:
            raise ValueError(f"cannot parse method component {comp!r} in {spec!r}; expected name[(k=v,...)][@budget]")
        builder = lookup(m["name"])
        budget = parse_budget(m["budget"]) if m["budget"] else None
        if budget is not None and not builder.takes_budget:
            raise ValueError(f"method {builder.name!r} takes no budget (got {comp!r})")
        parts.append((builder, _parse_options(m["opts"], spec, takes_scorer=_takes_scorer(builder)), budget))
    budgets = {b for _, _, b in parts if b is not None}
    if len(budgets) > 1:
        raise ValueError(f"{spec!r} gives different budgets {sorted(b.label for b in budgets)}; give one")
    budget = next(iter(budgets), None)
    policies = [p for p in parts if p[0].role == "policy"]
    transforms = [p for p in parts if p[0].role == "transform"]
    if not policies:
        policies = [(lookup("full"), {}, None)]
    if len(policies) > 2:
        raise ValueError(f"{spec!r} names {len(policies)} eviction policies; at most two (prefill+decode)")
    if len(policies) == 2 and any(not b.takes_budget for b, _, _ in policies):
        raise ValueError(f"{spec!r}: 'full' cannot be composed with another policy")
    for b, _, _ in policies:
        if b.needs_budget and budget is None:
            raise ValueError(f"method {b.name!r} needs a budget, e.g. {b.name}@0.25 or {b.name}@256t")
    return parts, budget, policies, transforms


def check_methods(specs) -> None:
    """Fails fast on a malformed spec (unknown name, bad option or budget syntax, budgets that do not
    fit the components) without building policies, which may need the model or the prompt length."""
    for s in (_split_top(specs) if isinstance(specs, str) else specs):
        _parse_parts(s)


def parse_method(spec: str, *, num_layers: int | None = None, context_len: int | None = None,
                 model=None) -> Method:
    """Builds the policy named by `spec` (see the module docstring). `num_layers` is needed by
    policies that spread budgets over depth (PyramidKV); `context_len` and `model` by methods
    whose policy depends on them (Quest with a ratio, DuoAttention)."""
    if model is not None and num_layers is None:
        num_layers = model.config.num_hidden_layers
    ctx = BuildContext(num_layers=num_layers, context_len=context_len, model=model)
    parts, budget, policies, transforms = _parse_parts(spec)
    built = [b.build(budget if b.takes_budget else None, o, ctx) for b, o, _ in policies]
    policy = built[0] if len(built) == 1 else Composite(prefill_policy=built[0], decode_policy=built[1])
    for b, o, _ in transforms:
        policy = b.build(policy, budget, o, ctx)
    label = "+".join(_component_label(b, o) for b, o, _ in parts) + (f"@{budget.label}" if budget else "")
    return Method(spec=spec, label=label, policy=policy, budget=budget,
                  components=tuple(b.name for b, _, _ in parts))


def _component_label(builder: MethodBuilder, options: dict) -> str:
    if not options:
        return builder.name
    items = [_scorer_label(options["scorer"])] if "scorer" in options else []
    items += [f"{k}={v}" for k, v in sorted(options.items()) if k != "scorer"]
    return f"{builder.name}(" + ",".join(items) + ")"


def _scorer_label(scorer) -> str:
    if isinstance(scorer, tuple):
        name, opts = scorer
        return f"{name}(" + ",".join(f"{k}={v}" for k, v in opts) + ")"
    return str(scorer)


def parse_methods(specs, *, num_layers: int | None = None, context_len: int | None = None,
                  model=None) -> list[Method]:
    """A comma-separated string or a list of specs -> Methods (duplicates by label removed)."""
    if isinstance(specs, str):
        specs = _split_top(specs)
    out, seen = [], set()
    for s in specs:
        m = parse_method(s, num_layers=num_layers, context_len=context_len, model=model)
        if m.label not in seen:
            seen.add(m.label)
            out.append(m)
    if not out:
        raise ValueError("no methods given")
    return out


def _split_top(text: str) -> list[str]:
    """Splits on commas outside parentheses ("h2o(recent_ratio=0.3,normalize=True)@0.25,full")."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s for s in out if s.strip()]


def method_grid(policies, budgets, *, include_full: bool = True) -> list[str]:
    """["full", "h2o@0.5", "h2o@0.25", ...] for every policy name x budget text."""
    out = ["full"] if include_full else []
    for p in policies:
        if _norm(p) == "full":
            continue
        out += [f"{p}@{b}" for b in budgets]
    return out


# ---------------------------------------------------------------------------------------------- builders
# for policies whose budget is not a prompt budget_ratio / budget_tokens


def _quest(budget, options, ctx: BuildContext):
    """quest@256t: attend over 256 tokens per step; quest@0.25: over 0.25 x context_len tokens.
    Quest evicts nothing (it saves bandwidth, not memory)."""
    opts = dict(options)
    if budget.tokens is not None:
        opts.setdefault("token_budget", budget.tokens)
    else:
        if ctx.context_len is None:
            raise ValueError("quest with a ratio budget needs the context length; give tokens (quest@512t)")
        opts.setdefault("token_budget", max(1, int(round(budget.ratio * ctx.context_len))))
    return make_policy("quest", num_layers=ctx.num_layers, **opts)


_DUO_SCORES: dict = {}


def duo_retrieval_fraction(ratio: float, context_len: int, n_sink: int, window: int) -> float:
    """Share of retrieval heads whose cache matches `ratio` of a full cache at `context_len`:
    r + (1 - r) w / S = ratio with w = n_sink + window (streaming heads' cache), clipped to [0, 1]."""
    w = min(n_sink + window, context_len) / context_len
    if w >= 1.0:
        return 1.0
    return float(min(max((ratio - w) / (1.0 - w), 0.0), 1.0))


def _duo(budget, options, ctx: BuildContext):
    """duo_attention(pattern_file=PATH): a calibrated pattern file. duo_attention@0.25: heads
    calibrated on `ctx.model` (attention statistics over synthetic passkey prompts, cached per
    model), binarised at the retrieval fraction whose memory is 25% of a full cache at
    context_len (streaming heads keep n_sink + window tokens)."""

    opts = dict(options)
    path = opts.pop("pattern_file", None)
    if path is not None:
        return DuoAttention.from_pattern_file(path, **opts)
    if budget is None:
        raise ValueError("duo_attention needs a budget (duo_attention@0.25) or pattern_file=PATH")
    if ctx.model is None or ctx.context_len is None:
        raise ValueError("duo_attention needs pattern_file=PATH, or a model and context length to calibrate on")
    n_sink, window = int(opts.get("n_sink", 64)), int(opts.get("window", 256))
    ratio = budget.ratio if budget.ratio is not None else min(budget.tokens / ctx.context_len, 1.0)
    key = (id(ctx.model), n_sink, window)
    if key not in _DUO_SCORES:
        length = max(min(ctx.context_len, 2048), n_sink + window + 64)
        prompts = dc.passkey_prompts(4, length, tokenizer=ctx.model.tokenizer, vocab_size=ctx.model.config.vocab_size,
                                     seed=1234)
        _DUO_SCORES[key] = dc.head_statistics(ctx.model, prompts, n_sink=n_sink, window=window, batch_size=2)
    frac = duo_retrieval_fraction(ratio, ctx.context_len, n_sink, window)
    pattern = dc.binarize(_DUO_SCORES[key], retrieval_fraction=frac)
    return DuoAttention(pattern=pattern, **opts)


def _expert_kv(budget, options, ctx: BuildContext):
    """expert_kv(shards=4,top_k=1,evict=h2o)@0.25: expert-sharded KV storage (cache/policies/expert_kv.py);
    without a budget every token is kept. top_k=all (or None, the default) attends over every shard."""
    opts = dict(options)
    if isinstance(opts.get("top_k"), str) and opts["top_k"].lower() in ("all", "none"):
        opts["top_k"] = None
    if budget is not None:
        opts.update(budget.as_options())
    return make_policy("expert_kv", num_layers=ctx.num_layers, **opts)


register_method("quest", _quest)
register_method("expert_kv", _expert_kv, needs_budget=False)
register_method("duo_attention", _duo, needs_budget=False)


__all__ = ["BuildContext", "Budget", "Method", "MethodBuilder", "available_methods", "lookup", "method_grid",
           "parse_budget", "duo_retrieval_fraction", "parse_method", "parse_methods", "register_method"]
