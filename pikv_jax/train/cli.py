"""`pikv distill`: distillation training from a YAML config with dotted overrides.

    pikv distill --config configs/distill_lora.yaml train.steps=200 optim.lr=1e-3 --run-dir runs/lora

`add_distill_args(parser)` registers the flags, `cmd_distill(args) -> int` runs; pikv_jax/cli/main.py wires
them. `python -m pikv_jax.train.cli ...` is the same command without the other subcommands. Progress
goes to stderr (a tqdm bar); the last line of stdout is one JSON object (the eval.json summary).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from pikv_jax.train.config import dump_config, load_config
from pikv_jax.train.trainer import train


def add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (configs/distill_lora.yaml, distill_duo.yaml, "
                   "distill_moe.yaml); omitted = all defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.steps=200 optim.lr=1e-3 model.name=tiny")
    p.add_argument("--run-dir", default=None, help="run directory (checkpoints, metrics.jsonl, eval.json, "
                   "artifacts); default runs/<config name>")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="resume from the run's last checkpoint; an error when there is none "
                        "(default: resume when the run directory has checkpoints)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start a new run; an error when the run directory already has checkpoints")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def default_run_dir(config_path: str | None) -> pathlib.Path:
    stem = pathlib.Path(config_path).stem if config_path else "distill"
    return pathlib.Path("runs") / stem


def cmd_distill(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "print_config", False):
        print(dump_config(cfg), end="")
        return 0

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[pikv] %(message)s", stream=sys.stderr)
    run_dir = pathlib.Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    print(f"[pikv] distill {cfg.task} -> {run_dir}", file=sys.stderr, flush=True)
    summary = train(cfg, run_dir, resume=args.resume, progress=getattr(args, "progress", True))
    h = summary["heldout"]
    lines = [f"[pikv] held-out {k}: initial {h['initial'][k]:.6g} -> final {h['final'][k]:.6g}"
             for k in ("loss", "kl_t1", "distill") if k in h.get("initial", {}) and k in h.get("final", {})]
    for line in lines:
        print(line, file=sys.stderr)
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pikv distill", description="distillation training (see pikv_jax/train)")
    add_distill_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_distill(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pikv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
