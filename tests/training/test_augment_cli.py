"""Choosing the augmentation preset: TrainConfig.augment_preset and ``train --augment``."""

from __future__ import annotations

import json

from training_helpers import run_cli, write_dataset

from napari_sam.cli import main
from napari_sam.training.config import TrainConfig, config_problems


def test_config_checks_the_preset():
    assert TrainConfig(data="d").augment_preset == "basic"  # earlier runs' augmentation
    assert config_problems(TrainConfig(data="d", augment_preset="general")) == []
    problems = dict(config_problems(TrainConfig(data="d", augment_preset="fancy")))
    assert problems["augment_preset"] == "must be one of basic, general, got 'fancy'"
    problems = dict(config_problems(TrainConfig(data="d", augment=False,
                                                augment_preset="general")))
    assert "augment=False" in problems["augment_preset"]
    # an old config.json (no augment_preset) reads as the basic preset
    old = TrainConfig(data="d").to_dict()
    del old["augment_preset"]
    assert TrainConfig.from_dict(old).augment_preset == "basic"


def test_train_augment_option(tiny_sam, tmp_path, capsys):
    from napari_sam.models.checkpoint import save_model

    ds = write_dataset(tmp_path / "ds", n=2)
    run = tmp_path / "run"
    res = run_cli("train", str(ds), "-o", str(run), "--augment", "fancy", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "argument --augment: invalid choice: 'fancy'" in res.stderr
    assert not run.exists()
    res = run_cli("train", str(ds), "-o", str(run), "--augment", "general", "--no-augment",
                  cwd=tmp_path)
    assert res.returncode == 2 and "napari-sam train: error: --augment chooses" in res.stderr
    assert "Traceback" not in res.stderr and not run.exists()
    res = run_cli("train", "--help", cwd=tmp_path)
    assert "--augment {basic,general}" in res.stdout
    # a real (two-step) run with the general preset records it; rerunning with another
    # preset is refused (the weights were trained with this one)
    model = save_model(tiny_sam, tmp_path / "tiny.safetensors")
    fast = ["--batch-size", "2", "--instances-per-image", "1", "--rounds", "1",
            "--warmup-steps", "0", "--num-threads", "1", "-m", str(model)]
    assert main(["train", str(ds), "-o", str(run), "--steps", "2", "--augment", "general",
                 *fast]) == 0
    assert json.loads((run / "config.json").read_text())["augment_preset"] == "general"
    assert (run / "last.safetensors").is_file()
    capsys.readouterr()
    assert main(["train", str(ds), "-o", str(run), "--steps", "3", *fast]) == 1
    assert "augment_preset" in capsys.readouterr().err
