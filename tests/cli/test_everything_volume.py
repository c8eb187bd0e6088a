"""``napari-sam everything`` on a 3D TIFF: linked 3D labels by default (issue 16).

Run as a user does: the real command in a subprocess, files in tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sam.engine.io import read_labels

_SRC = str(Path(__import__("napari_sam").__file__).resolve().parents[1])
GEN_ARGS = ["--mode", "amg", "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--device", "cpu"]


def _cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "napari_sam.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def tiny_model_path(tiny_sam, tmp_path):
    from napari_sam.models.checkpoint import save_model

    return save_model(tiny_sam, tmp_path / "tiny.safetensors")


@pytest.fixture
def z_stack(tmp_path) -> Path:
    """(3, 64, 64) uint16: the same plane three times (bright disks on a dark ground), so
    every plane gets the same masks and linking must give them the same ids."""
    import tifffile

    rr, cc = np.mgrid[:64, :64]
    plane = np.full((64, 64), 300, np.uint16)
    for r, c, v in ((20, 20, 3000), (44, 40, 2000), (18, 48, 4000)):
        plane[(rr - r) ** 2 + (cc - c) ** 2 < 60] = v
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, np.stack([plane] * 3), photometric="minisblack")
    return path


def test_a_3d_tiff_gets_3d_labels_by_default_and_planes_apart_on_request(
        tiny_model_path, z_stack, tmp_path):
    res = _cli("everything", z_stack, "-o", tmp_path / "linked", "-m", tiny_model_path, *GEN_ARGS)
    assert res.returncode == 0, res.stderr
    linked = read_labels(tmp_path / "linked" / "vol_labels.tif")
    assert linked.shape == (3, 64, 64) and linked.any()
    assert np.array_equal(linked[0], linked[1]) and np.array_equal(linked[1], linked[2])
    ids = np.unique(linked[linked > 0])
    assert ids.tolist() == list(range(1, ids.size + 1))  # 1..n in order of appearance

    res = _cli("everything", z_stack, "-o", tmp_path / "planes", "-m", tiny_model_path,
               "--no-link-planes", *GEN_ARGS)
    assert res.returncode == 0, res.stderr
    apart = read_labels(tmp_path / "planes" / "vol_labels.tif")
    assert np.array_equal(apart[0] > 0, linked[0] > 0)
    assert apart[1][apart[1] > 0].min() > apart[0].max()  # the planes' ids never meet
    # the same objects: per-plane ids map one-to-one onto the linked ones
    pairs = {(int(a), int(b)) for a, b in zip(apart[1].ravel(), linked[1].ravel(), strict=True)}
    assert len({a for a, _ in pairs}) == len(pairs)


def test_coco_records_carry_the_linked_ids(tiny_model_path, z_stack, tmp_path):
    out = tmp_path / "vol_coco.json"
    res = _cli("everything", z_stack, "-o", out, "-m", tiny_model_path, *GEN_ARGS)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    per_image: dict[int, list[int]] = {}
    for ann in doc["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["label"])
    assert len(per_image) == 3
    assert per_image[1] == per_image[2] == per_image[3]  # one 3D object, one id in each plane


def test_link_options_are_checked_and_a_bad_axis_fails_that_image(
        tiny_model_path, z_stack, tmp_path):
    res = _cli("everything", z_stack, "-o", tmp_path / "o", "--link-iou", "1.5",
               "-m", tiny_model_path, *GEN_ARGS)
    assert res.returncode == 2 and "--link-iou: expected a number in [0, 1], got '1.5'" in (
        res.stderr)
    res = _cli("everything", z_stack, "-o", tmp_path / "o", "--link-axis", "1",
               "-m", tiny_model_path, *GEN_ARGS)
    assert res.returncode == 1
    assert "axis 1 is not a stack axis of labels of shape (3, 64, 64)" in res.stderr
    assert not (tmp_path / "o" / "vol_labels.tif").exists()
