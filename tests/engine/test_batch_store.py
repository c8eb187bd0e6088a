"""`napari-sam everything` reads the embedding store beside the image (issue 16 item 4)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import tifffile
import torch

from napari_sam.engine.batch import cached_model, clear_caches, process_image
from napari_sam.engine.io import read_image
from napari_sam.engine.predictor import Predictor
from napari_sam.engine.store import embed_to_store, store_path_for
from napari_sam.models.build import build_sam
from napari_sam.models.checkpoint import save_model


@pytest.fixture
def head_model_path(tiny_sam_config, tmp_path):
    torch.manual_seed(1)
    model = build_sam(dataclasses.replace(tiny_sam_config, ais_head_hidden=16)).eval()
    yield save_model(model, tmp_path / "head.safetensors")
    clear_caches()


@pytest.mark.parametrize("mode", ["ais", "amg"])
def test_everything_reads_the_store_beside_the_image(head_model_path, tmp_path, mode):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 4000, (4, 48, 64)).astype(np.uint16)
    image_path = tmp_path / "stack.tif"
    tifffile.imwrite(image_path, stack, photometric="minisblack")
    kwargs = {"points_per_side": 4} if mode == "amg" else {}

    def run(out: str):
        model = cached_model(str(head_model_path), None)
        calls = []
        hook = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
        try:
            result = process_image(image_path, tmp_path / out, str(head_model_path),
                                   generator_kwargs=kwargs, mode=mode, link_axis=0)
        finally:
            hook.remove()
        assert result.status == "done", result
        return tifffile.imread(tmp_path / out), len(calls), result.notes

    plain, plain_calls, notes = run("plain.tif")
    assert plain_calls >= 4 and not any("embeddings" in n for n in notes)
    loaded = read_image(image_path)
    predictor = Predictor(cached_model(str(head_model_path), None))
    embed_to_store(predictor, loaded.data, store_path_for(image_path),
                   contrast_limits=loaded.contrast_limits())
    stored, stored_calls, notes = run("stored.tif")
    assert any(n.startswith("reading embeddings from") for n in notes), notes
    assert stored_calls == 0  # every plane came from the store
    np.testing.assert_array_equal(stored, plain)
    # a store is not kept on the shared generator after its image
    shutil.rmtree(store_path_for(image_path))
    again, again_calls, _ = run("again.tif")
    assert again_calls >= 4
    np.testing.assert_array_equal(again, plain)
