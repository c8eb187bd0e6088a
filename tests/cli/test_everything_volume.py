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


@pytest.fixture
def stack_with_a_short_object(tmp_path) -> Path:
    """(4, 64, 64): the z_stack plane three times, then a different plane. At --link-iou 1
    only identical masks link, so the tiny model's object of the last plane is one plane
    long and that of planes 0-2 three planes long."""
    import tifffile

    rr, cc = np.mgrid[:64, :64]

    def plane(spots):
        p = np.full((64, 64), 300, np.uint16)
        for r, c, v in spots:
            p[(rr - r) ** 2 + (cc - c) ** 2 < 60] = v
        return p

    same = plane(((20, 20, 3000), (44, 40, 2000), (18, 48, 4000)))
    other = plane(((50, 12, 3500), (10, 30, 2500)))
    path = tmp_path / "short.tif"
    tifffile.imwrite(path, np.stack([same, same, same, other]), photometric="minisblack")
    return path


def _planes_of(labels: np.ndarray) -> dict[int, list[int]]:
    return {int(i): np.flatnonzero((labels == i).any((1, 2))).tolist()
            for i in np.unique(labels[labels > 0])}


def test_min_planes_drops_short_linked_objects_by_default_and_as_given(
        tiny_model_path, stack_with_a_short_object, tmp_path):
    from napari_sam.engine.stack import MIN_PLANES, drop_short_objects

    def run(name: str, *options: str) -> np.ndarray:
        res = _cli("everything", stack_with_a_short_object, "-o", tmp_path / name,
                   "-m", tiny_model_path, "--link-iou", "1", *options, *GEN_ARGS)
        assert res.returncode == 0, res.stderr
        return read_labels(tmp_path / name)

    everything = run("all.tif", "--min-planes", "1")
    lengths = sorted(len(p) for p in _planes_of(everything).values())
    assert 1 in lengths and max(lengths) >= 3  # not vacuous: a short and a long object
    default = run("default.tif")
    np.testing.assert_array_equal(default, drop_short_objects(everything, 0, MIN_PLANES))
    three = run("three.tif", "--min-planes", "3")
    assert sorted(len(p) for p in _planes_of(three).values()) == [3]
    assert np.unique(three).tolist() == [0, 1]  # ids stay consecutive
    np.testing.assert_array_equal(three, drop_short_objects(everything, 0, 3))


def test_min_planes_does_not_touch_a_2d_image(tiny_model_path, tmp_path):
    from PIL import Image

    rr, cc = np.mgrid[:64, :64]
    img = np.full((64, 64), 30, np.uint8)
    img[(rr - 30) ** 2 + (cc - 30) ** 2 < 80] = 200
    Image.fromarray(img).save(tmp_path / "flat.png")
    outs = []
    for n in ("1", "5"):
        res = _cli("everything", tmp_path / "flat.png", "-o", tmp_path / f"flat_{n}.tif",
                   "-m", tiny_model_path, "--min-planes", n, *GEN_ARGS)
        assert res.returncode == 0, res.stderr
        outs.append(read_labels(tmp_path / f"flat_{n}.tif"))
    assert outs[0].any()
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("options, message", [
    (["--min-planes", "0"], "--min-planes: expected a positive integer"),
    (["--min-planes", "two"], "--min-planes"),
    (["--min-planes", "2", "--no-link-planes"], "--min-planes applies to linked objects only"),
])
def test_a_bad_min_planes_is_a_usage_error(tiny_model_path, z_stack, tmp_path, options,
                                           message):
    res = _cli("everything", z_stack, "-o", tmp_path / "o", "-m", tiny_model_path, *options,
               *GEN_ARGS)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
