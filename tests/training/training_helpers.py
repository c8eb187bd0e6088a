"""Shared helpers of the training tests: small synthetic datasets, run configs and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from napari_sam.training import TrainConfig

SRC = Path(__file__).resolve().parents[2] / "src"


def disk_image(size: int = 64, n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy image with ``n`` bright non-overlapping disks and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(30, 5, (size, size))
    lab = np.zeros((size, size), np.uint16)
    k = 0
    for _ in range(50):
        if k == n:
            break
        r = rng.uniform(size / 14, size / 7)
        cy, cx = rng.uniform(r, size - r, 2)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        if (lab[m] > 0).any():
            continue
        k += 1
        lab[m] = k
        img[m] = 200
    return np.clip(img, 0, 255).astype(np.uint8), lab


def write_dataset(root: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        img, lab = disk_image(size, seed=seed + i)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"im{i}.png")
    return root


def run_config(tmp_path: Path, model: Any, **overrides: Any) -> TrainConfig:
    """A short run on ``tmp_path/data`` into ``tmp_path/run``, logging every step (1 thread)."""
    base = dict(
        data=str(tmp_path / "data"),
        output_dir=str(tmp_path / "run"),
        model=model,
        steps=30,
        batch_size=2,
        instances_per_image=3,
        rounds=2,
        lr=1e-3,
        warmup_steps=3,
        log_every=1,
        checkpoint_every=1000,
        seed=0,
        num_threads=1,
    )
    base.update(overrides)
    return TrainConfig(**base)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m napari_sam.cli *args`` in a subprocess, as a user runs it."""
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "napari_sam.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
