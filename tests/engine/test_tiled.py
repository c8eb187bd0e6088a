"""Interactive prediction on large images in native-scale tiles (issue 15, item 3).

The stand-in model below predicts, for a click, the connected bright region under it at the
model input's own resolution: its mask depends only on the pixels it sees, never on their
scale or on context further away. So when a tile is seen at native scale, the *untiled*
prediction of the same model at native scale (a model whose input is the whole image) is
the exact answer the tiled one must reproduce, and an object across tile borders tests the
routing and the stitching alone, without the model's own errors.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_sam.engine.cache import EmbeddingCache
from napari_sam.engine.predictor import Predictor
from napari_sam.engine.tiled import (
    OUTSIDE_LOGIT,
    TILE_ABOVE,
    TiledEmbedding,
    route_prompt,
    tiling_for,
)
from napari_sam.errors import InvalidInputError


class _Encoder(torch.nn.Module):
    """The (normalised) red channel, folded into 16 channels of a (S/4, S/4) grid."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.pixel_unshuffle(x[:, :1], 4)


class _PromptEncoder(torch.nn.Module):
    """Sparse prompts as raw rows (x, y, label); box corners get labels 2 and 3."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.mask_input_size = (img_size, img_size)
        self.grid = img_size // 4

    def get_dense_pe(self) -> torch.Tensor:
        return torch.zeros(1, 16, self.grid, self.grid)

    def forward(self, points=None, boxes=None, masks=None):
        rows = []
        if points is not None:
            coords, labels = points
            rows.append(torch.cat([coords, labels[..., None].float()], -1))
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            rows.append(torch.cat([corners, torch.tensor([2.0, 3.0]).expand(
                len(corners), 2)[..., None]], -1))
        sparse = torch.cat(rows, 1)
        return sparse, torch.zeros(len(sparse), 16, self.grid, self.grid)


class _ComponentDecoder(torch.nn.Module):
    """Logits +10 on the bright connected region under the first positive point (or the
    box centre), -10 elsewhere; the same mask for each of the three candidates."""

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                dense_prompt_embeddings, multimask_output):
        bright = F.pixel_shuffle(image_embeddings, 4)[0, 0].numpy() > 0.5
        regions, _ = ndimage.label(bright)
        out = []
        for prompt in sparse_prompt_embeddings.numpy():
            pos = prompt[prompt[:, 2] == 1]
            xy = pos[0, :2] if len(pos) else prompt[prompt[:, 2] >= 2, :2].mean(0)
            k = regions[int(xy[1]), int(xy[0])]
            mask = (regions == k) if k else np.zeros_like(bright)
            out.append(np.where(mask, 10.0, -10.0))
        n = 3 if multimask_output else 1
        low = torch.as_tensor(np.stack(out), dtype=torch.float32)[:, None].repeat(1, n, 1, 1)
        return low, torch.ones(len(out), n)


class LocalModel(torch.nn.Module):
    """A model whose masks depend only on local pixels (module docstring)."""

    mask_threshold = 0.0

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.image_encoder = _Encoder(img_size)
        self.prompt_encoder = _PromptEncoder(img_size)
        self.mask_decoder = _ComponentDecoder()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return F.pad(x / 255.0, (0, self.img_size - w, 0, self.img_size - h))


TILE = 128  # the stand-in's input: tiles of 128 px, overlap 64 (the AIS head's)
SIZE = 384  # > TILE_ABOVE x TILE: tiled


def _ellipse_image(centre=(150, 200), radii=(40, 110), size=SIZE) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    inside = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1
    rgb = np.random.default_rng(0).integers(0, 60, (size, size, 3), dtype=np.uint8)
    rgb[inside] = 255  # dim noise around: every tile's pixels differ
    rgb[300:330, 40:70] = 255  # a small object inside one tile
    return rgb


def _tiled_predictor(**kwargs) -> Predictor:
    return Predictor(LocalModel(TILE), decoder="reference", tiling="auto", **kwargs)


def test_the_tiling_rule_reuses_the_ais_tiles_and_switches_off():
    assert tiling_for((TILE_ABOVE * 256, 100), 256) is None  # not larger than 2 x input
    assert tiling_for((1024, 1024), 256) == (256, 64)  # native scale, AIS overlap
    assert tiling_for((1024, 1024), 256, "off") is None
    with pytest.raises(InvalidInputError, match="tiling must be one of"):
        tiling_for((1024, 1024), 256, "on")
    with pytest.raises(InvalidInputError, match="tiling must be one of"):
        Predictor(LocalModel(TILE), decoder="reference", tiling=True)


def test_a_mask_across_tile_borders_equals_the_untiled_one_at_native_scale():
    rgb = _ellipse_image()
    tiled = _tiled_predictor()
    tiled.set_image(rgb)
    assert isinstance(tiled.tiled, TiledEmbedding) and len(tiled.tiled.boxes) == 25
    whole = Predictor(LocalModel(SIZE), decoder="reference")  # sees the image at native scale
    whole.set_image(rgb)
    assert whole.tiled is None
    for point in ([150, 200], [150, 100], [150, 300], [120, 205]):
        got = tiled.predict(points=[point])
        want = whole.predict(points=[point])
        assert got.masks.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(got.masks[0], want.masks[0])
        assert len(tiled._tiled.last_tiles) > 1  # it did cross tiles
        assert "stitched" in tiled.route_note
    # the ellipse spans columns 90..310: several tiles; the truth itself
    assert got.masks[0].sum() == (rgb[..., 0] == 255).sum() - 30 * 30
    # logits: the tiles' inside the visited tiles, OUTSIDE_LOGIT beyond them
    logits = tiled.predict(points=[[315, 55]], return_logits=True).masks[0]
    assert tiled._tiled.last_tiles == [20]  # the small square lies in one tile (row 5, col 1)
    assert logits.min() == OUTSIDE_LOGIT and (logits > 0).sum() == 30 * 30


def test_prompts_go_to_the_tile_that_holds_them_and_corrections_stay_there():
    boxes = [(0, 0, 128, 128), (0, 64, 128, 192), (0, 128, 128, 256)]
    shape = (128, 256)
    assert route_prompt(boxes, shape, np.array([[60.0, 10.0]]), None) == 0
    assert route_prompt(boxes, shape, np.array([[60.0, 130.0]]), None) == 1  # deepest
    assert route_prompt(boxes, shape, np.array([[60.0, 250.0]]), None) == 2
    assert route_prompt(boxes, shape, None, np.array([10.0, 70.0, 50.0, 180.0])) == 1
    assert route_prompt(boxes, shape, np.array([[5.0, 5.0], [5.0, 250.0]]), None) is None

    rgb = _ellipse_image()
    p = _tiled_predictor()
    p.set_image(rgb)
    first = p.predict(points=[[315, 55]], multimask=True)
    tile = p._tiled.last_tiles
    # a correction click that another tile would hold better keeps the first tile's frame
    p.predict(points=[[315, 55], [320, 66]], labels=[1, 0], mask_input=first.logits[0][None],
              multimask=False)
    assert p._tiled.last_tiles == tile and "not reused" not in p.route_note
    # without the mask prompt the same points route on their own
    assert route_prompt(p.tiled.boxes, (SIZE, SIZE), np.array([[315.0, 55], [320, 66]]),
                        None) == tile[0]


def test_a_prompt_no_tile_holds_falls_back_to_the_whole_image_and_says_so():
    p = _tiled_predictor()
    p.set_image(_ellipse_image())
    with pytest.warns(UserWarning, match="spans more than one tile"):
        pred = p.predict(box=[100, 60, 200, 340], multimask=False)
    assert p._tiled.last_tiles == [-1] and "whole image at model scale" in p.route_note
    assert pred.masks.shape == (1, SIZE, SIZE) and pred.masks[0, 150, 200]
    # a correction of that prediction stays on the whole image, with its mask prompt
    with pytest.warns(UserWarning, match="spans more than one tile"):
        p.predict(points=[[150, 200]], box=[100, 60, 200, 340], mask_input=pred.logits,
                  multimask=False)
    assert p._tiled.last_tiles == [-1] and "not reused" not in p.route_note
    # logits the predictor never returned are not trusted: warned, decoded afresh
    with pytest.warns(UserWarning, match="mask_input is not from this image's tile"):
        p.predict(points=[[150, 200]], mask_input=np.zeros((1, TILE, TILE)))
    assert "not reused" in p.route_note
    # a mask prompt from a tile cannot steer the whole-image frame: decoded afresh
    tile_logits = p.predict(points=[[315, 55]]).logits[0][None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.predict(points=[[10, 10], [370, 370]], labels=[0, 1], mask_input=tile_logits)
    assert "not reused" in p.route_note


def test_tile_embeddings_are_cached_and_reused():
    cache = EmbeddingCache()
    p = _tiled_predictor(cache=cache)
    rgb = _ellipse_image()
    p.set_image(rgb)
    encoder = p.model.image_encoder
    n_tiles = len(p.tiled.boxes)
    assert encoder.calls == n_tiles and len(cache) == n_tiles
    other = Predictor(p.model, cache=cache, decoder="reference", tiling="auto")
    other.set_image(rgb)  # another predictor of the same model: all from the cache
    p.set_image(rgb)
    p.predict(points=[[150, 200]])  # stitching decodes neighbours from the same embeddings
    assert encoder.calls == n_tiles and cache.hits >= 2 * n_tiles
    # prepare_image leaves the current image alone (the widget's worker calls it)
    entry = p.prepare_image(rgb)
    assert isinstance(entry, TiledEmbedding) and encoder.calls == n_tiles


def test_batched_prompts_and_bad_inputs_on_a_tiled_image():
    p = _tiled_predictor()
    p.set_image(_ellipse_image())
    batch = p.predict(points=[[[150, 200]], [[315, 55]]], multimask=False)
    assert batch.masks.shape == (2, 1, SIZE, SIZE) and batch.logits.shape == (2, 1, TILE, TILE)
    assert batch.masks[1, 0].sum() == 30 * 30
    with pytest.raises(InvalidInputError, match="outside the image"):
        p.predict(points=[[SIZE + 5, 10]])
    with pytest.raises(InvalidInputError, match="mask_input must be low-res logits"):
        p.predict(points=[[10, 10]], mask_input=np.zeros((1, 64, 64)))
    with pytest.raises(InvalidInputError, match="tiled"):
        p.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1))
    assert p.embedding is None  # no single embedding while tiled
    # a small image is never tiled; set_embedding leaves the tiled mode
    p.set_image(_ellipse_image()[:200, :200])
    assert p.tiled is None and p.embedding is not None and p.route_note == ""


def test_stitching_stops_after_max_stitched_tiles_and_says_so():
    from napari_sam.engine.tiled import MAX_STITCHED_TILES

    rgb = _ellipse_image()
    rgb[20:364, 20:364] = 255  # one object over all 25 tiles
    p = _tiled_predictor()
    p.set_image(rgb)
    pred = p.predict(points=[[190, 190]], multimask=False)
    assert len(p._tiled.last_tiles) == MAX_STITCHED_TILES
    assert f"reaches beyond {MAX_STITCHED_TILES} tiles" in p.route_note
    assert 0 < pred.masks[0].sum() < 344 * 344
