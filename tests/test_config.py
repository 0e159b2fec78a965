"""Config layer: YAML + dotted overrides -> frozen dataclasses; every mistake names its key."""
import dataclasses
import subprocess
import sys

import pytest

from dsrna_dist.config import (ConfigError, EvalConfig, SearchConfig, TrainConfig, dump_yaml, from_dict,
                               load_config, replace, to_dict)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "s.yaml", "epochs: 3\noptim:\n  lr: 0.1\ndata:\n  name: mnist\n")
    cfg = load_config(SearchConfig, path, {"optim.momentum": 0.5, "model.primitives": "none,skip_connect"})
    assert cfg.epochs == 3 and cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.5
    assert cfg.data.name == "mnist" and cfg.model.primitives == ("none", "skip_connect")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4  # type: ignore[misc]


def test_base_include_deep_merges(tmp_path):
    write(tmp_path, "base.yaml", "epochs: 7\noptim:\n  lr: 0.2\n  momentum: 0.8\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\noptim:\n  lr: 0.3\n")
    cfg = load_config(SearchConfig, child)
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.momentum) == (7, 0.3, 0.8)


@pytest.mark.parametrize("text,needle", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("optim:\n  lr: -1\n", "optim.lr"),
    ("dist:\n  backend: mpi\n", "dist.backend"),
    ("epochs: 2.5\n", "epochs"),
    ("run: 3\n", "run"),
    ("run:\n  resume: maybe\n", "run.resume"),
])
def test_bad_values_name_key_and_file(tmp_path, text, needle):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(SearchConfig, path)
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(TrainConfig, write(tmp_path, "x.yaml", "a: [1, 2\n"))


def test_round_trip_and_replace():
    cfg = load_config(EvalConfig, None, {"certify.num_examples": 5})
    back = from_dict(EvalConfig, to_dict(cfg))
    assert back == cfg
    assert replace(cfg, **{"run.seed": 3}).run.seed == 3
    assert "num_examples: 5" in dump_yaml(cfg)
    with pytest.raises(ConfigError):
        replace(cfg, **{"run.seed": -3})


def test_nested_list_of_dataclasses():
    cfg = load_config(EvalConfig, None, {"attacks": [{"name": "pgd", "steps": 3}]})
    assert len(cfg.attacks) == 1 and cfg.attacks[0].steps == 3
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.stepz"):
        load_config(EvalConfig, None, {"attacks": [{"name": "pgd", "stepz": 3}]})


@pytest.mark.parametrize("kind,cls", [("search", SearchConfig), ("train", TrainConfig), ("eval", EvalConfig)])
def test_every_shipped_config_validates(kind, cls):
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs", kind)
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert paths, f"no configs in {root}"
    for p in paths:
        load_config(cls, p)  # raises ConfigError naming key and file


@pytest.mark.parametrize("stage,key", [("search", "--strategy.name"), ("train", "--model.genotype"),
                                       ("evaluate", "--certify.methods"), ("report", "--runs")])
def test_every_stage_prints_real_help(stage, key):
    out = subprocess.run([sys.executable, "-m", f"dsrna_dist.{stage}", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and key in out.stdout


def test_stage_typo_is_one_line_error_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsrna_dist.search", "--optim.lrr=0.1",
                          f"--run.out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown key 'optim.lrr'" in out.stderr and not any(tmp_path.iterdir())
