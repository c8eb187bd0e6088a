"""Automatic instance segmentation: the head inside the model, watershed decoding, tiles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from napari_sam.engine.ais import AisSettings, InstanceSegmenter, instances_from_maps
from napari_sam.errors import InvalidInputError
from napari_sam.models.build import build_sam, config_from_state_dict
from napari_sam.models.checkpoint import model_from_checkpoint, save_model


def _disc_maps(shape, centres, radius):
    """Ideal maps of discs: foreground, boundary (unused), centre proximity, boundary distance."""
    rr, cc = np.indices(shape, dtype=np.float32)
    maps = np.zeros((4, *shape), dtype=np.float32)
    for r, c in centres:
        d = np.hypot(rr - r, cc - c)
        inside = d < radius
        closer = inside & (1 - d / radius > maps[2])
        maps[0][inside] = 1.0
        maps[2][closer] = (1 - d / radius)[closer]
        maps[3][closer] = (1 - d / radius)[closer]
    return maps


def test_touching_discs_become_two_instances_split_between_them():
    maps = _disc_maps((40, 60), [(20, 18), (20, 40)], radius=12)  # overlapping discs
    labels = instances_from_maps(maps, AisSettings(center_threshold=0.5, min_size=5))
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2}
    assert labels[20, 18] != labels[20, 40]
    # the watershed line falls midway: columns left of 29 belong to the left disc
    row = labels[20]
    assert set(row[8:28]) == {labels[20, 18]} and set(row[30:51]) == {labels[20, 40]}
    assert (labels > 0).sum() == (maps[0] > 0.5).sum()


def test_empty_and_seedless_maps_give_no_objects():
    assert not instances_from_maps(np.zeros((4, 8, 9))).any()
    maps = np.zeros((4, 8, 9), dtype=np.float32)
    maps[0, 2:6, 2:6] = 0.9  # foreground without any centre
    assert not instances_from_maps(maps).any()


def test_small_objects_are_removed_and_ids_stay_consecutive():
    maps = _disc_maps((30, 60), [(15, 10), (15, 30), (15, 50)], radius=6)
    maps[:, :, 25:36] = 0
    maps[:, 13:18, 28:33] = _disc_maps((5, 5), [(2, 2)], radius=3)  # a 5x5-ish object
    labels = instances_from_maps(maps, AisSettings(min_size=30))
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert labels[15, 30] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"foreground_threshold": 1.5}, "foreground_threshold"),
     ({"center_threshold": float("nan")}, "center_threshold"),
     ({"min_size": -1}, "min_size"), ({"min_size": 2.5}, "min_size")],
)
def test_settings_are_checked(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        AisSettings(**kwargs)


def test_maps_of_the_wrong_shape_are_refused():
    with pytest.raises(InvalidInputError, match=r"shape \(4, H, W\)"):
        instances_from_maps(np.zeros((3, 8, 8)))


def test_model_without_head_is_refused_with_the_way_out(tiny_sam):
    with pytest.raises(InvalidInputError, match="no AIS head.*aux-dense"):
        InstanceSegmenter(tiny_sam)


@pytest.fixture
def tiny_sam_with_head(tiny_sam_config):
    torch.manual_seed(1)
    return build_sam(dataclasses.replace(tiny_sam_config, ais_head_hidden=16)).eval()


def test_head_is_saved_inside_the_weights_and_found_again(tiny_sam_with_head, tiny_sam, tmp_path):
    sd = tiny_sam_with_head.state_dict()
    assert "ais_head.net.0.weight" in sd
    assert config_from_state_dict(sd).ais_head_hidden == 16
    path = save_model(tiny_sam_with_head, tmp_path / "m.safetensors")
    back = model_from_checkpoint(path)
    assert back.ais_head is not None
    for key, value in back.state_dict().items():
        assert torch.equal(value, sd[key]), key
    # a head-less model (every official checkpoint) has no head and an unchanged config
    assert tiny_sam.ais_head is None
    assert "ais_head_hidden" not in tiny_sam.config.to_dict()
    assert not any(k.startswith("ais_head") for k in tiny_sam.state_dict())


def test_generate_gives_everything_mode_records(tiny_sam_with_head):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    seg = InstanceSegmenter(tiny_sam_with_head, center_threshold=0.5, foreground_threshold=0.5,
                            output_mode="cropped_mask")
    maps = seg.maps(image)
    assert maps.shape == (4, 90, 120) and maps.min() >= 0 and maps.max() <= 1
    records = seg.generate(image)
    labels = seg.generate_labels(image)
    assert labels.dtype == np.uint32 and labels.max() == len(records)
    for k, r in enumerate(records, start=1):
        r0, c0, r1, c1 = r["bbox_rc"]
        np.testing.assert_array_equal(r["segmentation"], labels[r0:r1, c0:c1] == k)
        assert r["bbox"] == [c0, r0, c1 - c0 - 1, r1 - r0 - 1] and r["area"] > 0


class _LocalMaps(InstanceSegmenter):
    """A segmenter whose maps depend only on each pixel's value (no model context)."""

    def __init__(self):
        self.settings = AisSettings(min_size=1)
        self.output_mode = "binary_mask"
        self.predictor = None

    @property
    def model(self):
        return type("M", (), {"img_size": 64})()

    def _image_maps(self, rgb, use_cache):
        v = rgb[..., 0].astype(np.float32) / 255
        return np.stack([v > 0.1, v > 0.95, v, v]).astype(np.float32)


def test_tiled_maps_equal_untiled_maps_and_objects_across_tile_borders_stay_whole():
    image = np.zeros((150, 170, 3), dtype=np.uint8)
    maps = _disc_maps((150, 170), [(60, 64), (120, 30)], radius=20)  # (60, 64) spans a border
    image[..., 0] = np.round(np.maximum(maps[2], 0.2 * maps[0]) * 255).astype(np.uint8)
    seg = _LocalMaps()
    whole = seg.maps(image)
    tiled = seg.maps(image, tile_size=64, overlap=16)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)
    labels = instances_from_maps(tiled, seg.settings)
    assert len(np.unique(labels[maps[0] > 0])) == 2


# ---------------------------------------- issue 15.2: AIS wherever AMG is
# One rule decides the mode (resolve_mode), one factory builds the segmenter (make_segmenter);
# `napari-sam everything` / `evaluate` and the batch go through them.


def test_mode_is_resolved_in_one_place(tiny_sam, tiny_sam_with_head):
    from napari_sam.engine.ais import make_segmenter, mode_reason, resolve_mode
    from napari_sam.engine.everything import AutomaticMaskGenerator
    from napari_sam.engine.predictor import Predictor

    assert resolve_mode(tiny_sam_with_head) == "ais"
    assert resolve_mode(Predictor(tiny_sam_with_head), "auto") == "ais"
    assert resolve_mode(tiny_sam) == "amg"
    assert resolve_mode(tiny_sam_with_head, "amg") == "amg"
    assert mode_reason(tiny_sam_with_head) == "mode ais (the model has an AIS head)"
    assert mode_reason(tiny_sam) == "mode amg (the model has no AIS head)"
    with pytest.raises(InvalidInputError, match="no AIS head"):
        resolve_mode(tiny_sam, "ais")
    with pytest.raises(InvalidInputError, match="mode must be one of auto, amg, ais"):
        resolve_mode(tiny_sam, "everything")
    seg = make_segmenter(tiny_sam_with_head, "auto", {"points_per_side": 4}, {"min_size": 3})
    assert isinstance(seg, InstanceSegmenter) and seg.settings.min_size == 3
    gen = make_segmenter(tiny_sam_with_head, "amg", {"points_per_side": 4}, {"min_size": 3})
    assert isinstance(gen, AutomaticMaskGenerator)
    import napari_sam
    import napari_sam.engine

    assert napari_sam.InstanceSegmenter is InstanceSegmenter
    assert napari_sam.engine.AisSettings is AisSettings


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tile_size": 8}, "tile_size"), ({"tile_size": "big"}, "tile_size"),
     ({"tile_size": True}, "tile_size"), ({"overlap": -1}, "overlap"),
     ({"tile_size": 64, "overlap": 64}, "overlap"), ({"min_sise": 3}, "min_sise")],
)
def test_tiling_arguments_are_checked(tiny_sam_with_head, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        InstanceSegmenter(tiny_sam_with_head, **kwargs)


def test_images_larger_than_the_model_input_are_tiled_by_default(tiny_sam_with_head):
    from napari_sam.engine.everything import EverythingProgress
    from napari_sam.errors import CancelledError

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)  # > 128 px, the model input
    # random weights: a centre threshold at which the tiny model finds objects
    seg = InstanceSegmenter(tiny_sam_with_head, output_mode="cropped_mask", center_threshold=0.5)
    assert seg.tile_size_for((150, 200)) == 128 and seg.tile_size_for((128, 100)) is None
    calls = []
    labels = seg.generate_labels(image, progress=lambda d, t: calls.append((d, t)))
    n = seg.n_tiles((150, 200))
    from napari_sam.engine.ais import AIS_TILE_OVERLAP
    from napari_sam.engine.tiles import tile_boxes

    assert n == len(tile_boxes((150, 200), tile_size=128, overlap=AIS_TILE_OVERLAP)) > 1
    assert calls == [(k, n) for k in range(1, n + 1)]
    # the same maps as the explicit tiled call at native scale, decoded the same
    expected = instances_from_maps(seg.maps(image, tile_size=128, overlap=AIS_TILE_OVERLAP),
                                   seg.settings)
    np.testing.assert_array_equal(labels, expected)
    assert labels.max() > 0
    # records agree with the labels; iter_generate yields progress per tile, then them
    steps = list(seg.iter_generate(image))
    assert [s for s in steps[:-1]] == [EverythingProgress(k, n) for k in range(1, n + 1)]
    records = steps[-1]
    assert len(records) == labels.max()
    for k, r in enumerate(records, start=1):
        r0, c0, r1, c1 = r["bbox_rc"]
        np.testing.assert_array_equal(r["segmentation"], labels[r0:r1, c0:c1] == k)
    # untiled on request: one embedding of the whole image
    calls.clear()
    InstanceSegmenter(tiny_sam_with_head, tile_size=None).generate_labels(
        image, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 1)]
    # cancel is polled between tiles
    polls = []

    def cancel_after_two() -> bool:
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(CancelledError):
        seg.generate(image, cancel=cancel_after_two)
    assert len(polls) == 3


def test_ais_reuses_the_interactive_predictors_tiles_of_a_large_image(tiny_sam_with_head):
    """Issue 15.3: the tiles the interactive predictor embeds for a large image are the AIS
    head's tiles, so AIS on the same predictor runs no encoder again (and vice versa)."""
    from napari_sam.engine.predictor import Predictor

    image = np.random.default_rng(2).integers(0, 255, (300, 280, 3), dtype=np.uint8)
    predictor = Predictor(tiny_sam_with_head, tiling="auto")
    encoder = tiny_sam_with_head.image_encoder
    runs = []
    hook = encoder.register_forward_hook(lambda *_: runs.append(1))
    try:
        predictor.set_image(image)
        n = len(predictor.tiled.boxes)
        seg = InstanceSegmenter(predictor)
        assert seg.n_tiles((300, 280)) == n and len(runs) == n
        labels = seg.generate_labels(image)
        assert len(runs) == n  # every tile from the cache
        # the maps are those of tiles embedded afresh
        np.testing.assert_array_equal(
            labels, InstanceSegmenter(tiny_sam_with_head).generate_labels(image))
    finally:
        hook.remove()


# ---------- the command line, as a user runs it (subprocess, real files)

def _cli(*args, timeout: int = 300):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__import__("napari_sam").__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "napari_sam.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _blobs(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), 30, dtype=np.uint8)
    rr, cc = np.mgrid[:size[0], :size[1]]
    for _ in range(6):
        r, c = rng.integers(12, min(size) - 12, size=2)
        img[(rr - r) ** 2 + (cc - c) ** 2 < 60] = rng.integers(120, 255, size=3)
    return img


@pytest.fixture
def head_model_path(tiny_sam_with_head, tmp_path):
    return save_model(tiny_sam_with_head, tmp_path / "head.safetensors")


def test_cli_everything_runs_ais_on_a_model_with_a_head_and_tiles_stacks(
        head_model_path, tiny_sam_with_head, tmp_path):
    import tifffile

    from napari_sam.engine.io import read_labels

    planes = np.stack([_blobs((140, 170), seed) for seed in range(3)])  # > 128 px: tiled
    tifffile.imwrite(tmp_path / "stack.tif", planes[..., 0], photometric="minisblack")
    res = _cli("everything", tmp_path / "stack.tif", "--out", tmp_path / "out",
               "-m", head_model_path, "--min-size", "5", "--center-threshold", "0.5",
               "--no-link-planes")  # the per-plane id rule (linking: test_everything_volume)
    assert res.returncode == 0, res.stderr
    assert "mode ais (the model has an AIS head)" in res.stderr
    assert "recommended settings" not in res.stderr  # AMG's thresholds do not apply
    labels = read_labels(tmp_path / "out" / "stack_labels.tif")
    assert labels.shape == (3, 140, 170) and labels.max() > 0
    # ids: unique over the stack, consecutive from 1 in plane order (engine/stack.py), and
    # each plane holds exactly the objects of the segmenter run on that plane alone
    seg = InstanceSegmenter(tiny_sam_with_head, min_size=5, center_threshold=0.5)
    start = 0
    for k in range(3):
        direct = seg.generate_labels(planes[k, ..., 0])
        ids = np.unique(labels[k][labels[k] > 0])
        np.testing.assert_array_equal(ids, np.arange(start + 1, start + len(ids) + 1))
        start += len(ids)
        pairs = np.unique(np.stack([labels[k].ravel(), direct.ravel()]), axis=1)
        assert len(pairs[0]) == len(set(pairs[0])) == len(set(pairs[1]))  # one-to-one
        assert ((labels[k] > 0) == (direct > 0)).all()


def test_cli_everything_mode_switch_and_refusals(head_model_path, tiny_sam, tmp_path):
    Image.fromarray(_blobs((96, 96), 0)).save(tmp_path / "a.png")
    res = _cli("everything", tmp_path / "a.png", "--out", tmp_path / "amg", "-m",
               head_model_path, "--mode", "amg", "--points-per-side", "4")
    assert res.returncode == 0, res.stderr
    assert "mode amg (--mode amg)" in res.stderr
    assert (tmp_path / "amg" / "a_labels.tif").is_file()
    # AMG-only options are refused when AIS runs (not silently ignored)
    res = _cli("everything", tmp_path / "a.png", "--out", tmp_path / "x", "-m",
               head_model_path, "--points-per-side", "4")
    assert res.returncode == 2
    assert ("--points-per-side applies to mode amg only, but this run uses mode ais "
            "(the model has an AIS head)") in res.stderr
    # --mode ais on a model without a head: a usage error saying what to do
    plain = save_model(tiny_sam, tmp_path / "plain.safetensors")
    res = _cli("everything", tmp_path / "a.png", "--out", tmp_path / "y", "-m", plain,
               "--mode", "ais")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--mode ais: This model has no AIS head" in res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_evaluate_mode_ais_writes_ap50(head_model_path, tmp_path):
    import json

    import tifffile

    ds = tmp_path / "ds"
    ds.mkdir()
    img = _blobs((96, 96), 1)
    Image.fromarray(img).save(ds / "cell.png")
    from scipy import ndimage

    tifffile.imwrite(ds / "cell_labels.tif", ndimage.label(img[..., 0] > 100)[0].astype(np.uint16))
    out = tmp_path / "res.json"
    res = _cli("evaluate", ds, "-m", head_model_path, "--mode", "ais", "--n-clicks", "0",
               "--no-box", "-o", out)
    assert res.returncode == 0, res.stderr
    results = json.loads(out.read_text())
    assert results["everything_mode"] == "ais" and results["settings"]["mode"] == "ais"
    assert 0.0 <= results["everything"]["ap50"] <= 1.0
    assert results["model"] == str(head_model_path)
    assert "everything mode" in res.stdout and "ais" in res.stdout
