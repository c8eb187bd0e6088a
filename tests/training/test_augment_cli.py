"""Choosing the augmentation preset: TrainConfig.augment_preset and ``train --augment``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from napari_sam.cli import main
from napari_sam.training.config import TrainConfig, config_problems

_SRC = str(Path(__file__).resolve().parents[2] / "src")


def _napari_sam(*args: object) -> subprocess.CompletedProcess:
    """``napari-sam ARGS`` in a subprocess, as a user types it (this checkout's package)."""
    env = {**os.environ, "PYTHONPATH": _SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "napari_sam.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def _dataset(root: Path) -> Path:
    """Two 64 x 64 images with bright disks and their labels (images/ + labels/)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:64, :64]
    for i in range(2):
        lab = np.zeros((64, 64), np.uint16)
        for k, (r, c) in enumerate(((18 + 4 * i, 20), (44, 42)), start=1):
            lab[(yy - r) ** 2 + (xx - c) ** 2 < 64] = k
        Image.fromarray(np.where(lab > 0, 200, 30).astype(np.uint8)).save(
            root / "images" / f"im{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"im{i}.png")
    return root


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

    ds = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    res = _napari_sam("train", ds, "-o", run, "--augment", "fancy")
    assert res.returncode == 2, res.stderr
    assert "argument --augment: invalid choice: 'fancy'" in res.stderr
    assert not run.exists()
    res = _napari_sam("train", ds, "-o", run, "--augment", "general", "--no-augment")
    assert res.returncode == 2 and "napari-sam train: error: --augment chooses" in res.stderr
    assert "Traceback" not in res.stderr and not run.exists()
    res = _napari_sam("train", "--help")
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
