"""Automatic instance segmentation: the head inside the model, watershed decoding, tiles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

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
