"""Distillation configs: the shipped YAML files load, dotted overrides are typed, unknown keys and bad
types raise errors that name them."""

from __future__ import annotations

import pathlib

import pytest

from pikv_jax.cli.main import build_parser
from pikv_jax.train.cli import main as distill_main
from pikv_jax.train.config import DistillConfig, load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,task", [("distill_lora.yaml", "lora"), ("distill_duo.yaml", "duo"),
                                       ("distill_moe.yaml", "moe")])
def test_shipped_configs_load(name, task):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, DistillConfig) and cfg.task == task


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "distill_lora.yaml",
                      ["train.steps=7", "optim.lr=1e-3", "data.text_files=[a.txt, b.txt]", "loss.hidden_layers=[-1, 0]",
                       "model.tiny={num_hidden_layers: 3}", "duo.threshold=0.5", "duo.retrieval_fraction=null",
                       "train.remat=true"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.data.text_files == ("a.txt", "b.txt")
    assert cfg.loss.hidden_layers == (-1, 0)
    assert cfg.model.tiny == {"num_hidden_layers": 3}
    assert cfg.duo.threshold == 0.5 and cfg.duo.retrieval_fraction is None
    assert cfg.train.remat is True


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", r"unknown config key 'optim\.lrr' \(did you mean 'lr'\?\)"),
    ("trian.steps=1", r"unknown config key 'trian'"),
    ("train.steps=abc", r"train\.steps must be an integer"),
    ("train.steps=1.5", r"train\.steps must be an integer"),
    ("optim.lr=fast", r"optim\.lr must be a number"),
    ("train.remat=maybe", r"train\.remat must be a boolean"),
    ("data.text_files={a: 1}", r"data\.text_files must be a list"),
    ("train.steps", "KEY=VALUE"),
    ("task=bert", "task='bert'; allowed"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("duo.threshold=0.5", "exactly one of duo.retrieval_fraction and duo.threshold"),
    ("data.prefix_len=500", r"data\.prefix_len must be in \[0, seq_len"),
    ("train.steps.x=1", "not a section"),
])
def test_bad_overrides_raise_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(bad)
    bad.write_text("optim: [1, 2]\n")
    with pytest.raises(ValueError, match="section optim must be a mapping"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_and_prints_resolved_config(capsys):
    assert distill_main(["--config", str(CONFIGS / "distill_moe.yaml"), "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert distill_main(["--config", str(CONFIGS / "distill_moe.yaml"), "train.steps=9", "--print-config"]) == 0
    assert "steps: 9" in capsys.readouterr().out


def test_pikv_distill_subcommand(capsys):
    """`pikv distill` (pikv_jax/cli/main.py wires add_distill_args / cmd_distill)."""
    args = build_parser().parse_args(["distill", "--config", str(CONFIGS / "distill_duo.yaml"),
                                       "duo.l1=0.1", "--print-config"])
    assert args.func(args) == 0
    assert "l1: 0.1" in capsys.readouterr().out
