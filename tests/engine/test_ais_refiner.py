"""The AIS map refiner: inside the model's weights, tiled refinement, the segmenter's use."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_sam.engine.ais import InstanceSegmenter, refine_maps
from napari_sam.errors import InvalidInputError
from napari_sam.models.ais_refiner import AisRefiner
from napari_sam.models.build import build_sam, config_from_state_dict
from napari_sam.models.checkpoint import model_from_checkpoint, save_model


@pytest.fixture
def model_with_refiner(tiny_sam_config):
    torch.manual_seed(2)
    config = dataclasses.replace(tiny_sam_config, ais_head_hidden=16, ais_refiner_widths=(4, 8))
    model = build_sam(config).eval()
    with torch.no_grad():  # a refiner that changes the maps (a new one returns them as they are)
        for p in model.ais_refiner.out.parameters():
            p.normal_(0, 0.5)
    return model


def _random_maps(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.01, 0.99, (4, *shape)).astype(np.float32)


def test_a_new_refiner_returns_the_head_maps():
    maps = _random_maps((24, 40))
    rgb = np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    out = refine_maps(AisRefiner((4, 8)).eval(), rgb, maps)
    np.testing.assert_allclose(out, maps, atol=1e-5)


def test_tiled_refinement_equals_one_pass(model_with_refiner):
    refiner = model_with_refiner.ais_refiner
    rgb = np.random.default_rng(3).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    maps = _random_maps((70, 100), seed=4)
    whole = refine_maps(refiner, rgb, maps, tile=1024)
    # tiles of 24 px with 32 px of context: more than this 2-level refiner reaches
    tiled = refine_maps(refiner, rgb, maps, tile=24, halo=32)
    assert not np.allclose(whole, maps, atol=1e-2)  # the refiner does something
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    with pytest.raises(InvalidInputError, match="must match"):
        refine_maps(refiner, rgb[:60], maps)


def test_refiner_is_saved_inside_the_weights(model_with_refiner, tiny_sam, tmp_path):
    sd = model_with_refiner.state_dict()
    assert config_from_state_dict(sd).ais_refiner_widths == (4, 8)
    back = model_from_checkpoint(save_model(model_with_refiner, tmp_path / "m.safetensors"))
    assert isinstance(back.ais_refiner, AisRefiner)
    for key, value in back.state_dict().items():
        assert torch.equal(value, sd[key]), key
    # official checkpoints: none, and the config keeps its old form
    assert tiny_sam.ais_refiner is None
    assert "ais_refiner_widths" not in tiny_sam.config.to_dict()
    with pytest.raises(InvalidInputError, match="ais_refiner_widths"):
        dataclasses.replace(tiny_sam.config, ais_refiner_widths=(8,))


def test_segmenter_decodes_the_refined_maps_unless_told_not_to(model_with_refiner):
    rgb = np.random.default_rng(5).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    plain = InstanceSegmenter(model_with_refiner, refine=False)
    refined = InstanceSegmenter(model_with_refiner)
    assert plain.refiner is None and refined.refiner is model_with_refiner.ais_refiner
    head_maps = plain.maps(rgb)
    np.testing.assert_allclose(
        refined.maps(rgb), refine_maps(model_with_refiner.ais_refiner, rgb, head_maps),
        atol=1e-6)
    # the labels follow the refined maps: a refiner that erases the foreground leaves none
    with torch.no_grad():
        model_with_refiner.ais_refiner.out.bias[0] = -100.0
    assert not refined.generate_labels(rgb).any()
    assert plain.generate_labels(rgb).shape == (90, 120)
