"""Interactive prediction on large images: native-scale tiles, prompt routing, stitching.

A model sees an image resized so that its longest side is its input size
(``img_size``: 256 px for the default model, 1024 for SAM). On an image much
larger than that, objects shrink to a few logit pixels and are lost (the default
model on 1024 px images: issue 15). :class:`~napari_sam.engine.predictor.Predictor`
built with ``tiling="auto"`` therefore embeds such an image at native scale, in
overlapping tiles, and predicts each prompt in the tile that holds it:

* **When.** :func:`tiling_for`: an (H, W) image whose longest side exceeds
  :data:`TILE_ABOVE` x ``img_size``. The tiles themselves are the AIS head's
  (:class:`~napari_sam.engine.ais.InstanceSegmenter`, ``tile_size="auto"``): tiles
  of ``img_size`` pixels overlapping by ``AIS_TILE_OVERLAP``, as decided by the
  one tiling policy, :func:`~napari_sam.engine.store.resolve_tiling`, and cut by
  :func:`~napari_sam.engine.tiles.tile_boxes`. Tile embeddings go through
  :meth:`Predictor.embed <napari_sam.engine.predictor.Predictor.embed>` (the
  embedding cache, then the store, then the encoder), keyed by the tile's pixels,
  so a tile is embedded once for every use of the same pixels.
* **Routing.** :func:`route_prompt`: of the tiles that hold every point and the
  whole box, the one where the prompt lies farthest from the tile's interior edges
  (edges that are not the image border). A correction (``mask_input``, the low-res
  logits of an earlier prediction) goes to the tile those logits came from, so the
  mask prompt stays in its own frame. A prompt no tile holds (a box larger than a
  tile, points far apart) is predicted on the whole image at model scale, with a
  warning (:attr:`TiledPredictor.note`).
* **Stitching.** When a candidate mask reaches within :data:`EDGE_MARGIN` pixels
  of an interior edge of a tile it was predicted in, the neighbouring tile across
  that edge is asked too: a positive point at the innermost pixel of the mask's
  part in the two tiles' overlap (plus the prompt's own points inside that tile),
  three candidates, of which the one that agrees best with the mask in the overlap
  is kept. Every pixel takes its logit from the tile that sees it farthest from an
  interior edge (in an overlap, the seam is at its middle); pixels no tile predicted
  get :data:`OUTSIDE_LOGIT`. This repeats until the mask touches no new tile, over at
  most :data:`MAX_STITCHED_TILES` tiles.
* The mask refiner (:mod:`napari_sam.engine.refine`), when the model has one,
  redraws the stitched full-resolution logits from the native image, as for an
  untiled prediction.

Coordinates are image data pixels, (row, col); tile boxes ``(row0, col0, row1,
col1)`` have exclusive ends.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sam.engine.cache import EmbeddedImage, image_key
from napari_sam.engine.progress import check_cancel
from napari_sam.errors import InvalidInputError

if TYPE_CHECKING:
    from napari_sam.engine.predictor import Prediction, Predictor

__all__ = [
    "EDGE_MARGIN",
    "MAX_STITCHED_TILES",
    "OUTSIDE_LOGIT",
    "TILE_ABOVE",
    "TILING_MODES",
    "TiledEmbedding",
    "TiledPredictor",
    "check_tiling_mode",
    "embed_tiles",
    "route_prompt",
    "tiling_for",
]

#: ``Predictor(tiling=...)``: "auto" tiles large images, "off" never tiles
TILING_MODES = ("auto", "off")
#: images whose longest side exceeds TILE_ABOVE x the model's input size are tiled
TILE_ABOVE = 2
#: a mask within this many pixels of a tile's interior edge continues in the next tile
EDGE_MARGIN = 2
#: the most tiles one mask is stitched over (about 4 x 4 tiles: a larger object is cut
#: there, and said so; the whole image at model scale sees such objects well)
MAX_STITCHED_TILES = 16
#: logit of pixels that no tile predicted (the mask threshold is 0)
OUTSIDE_LOGIT = -20.0
_WHOLE = -1  # route index of the whole image at model scale
_REMEMBERED_LOGITS = 64  # how many returned low-res logits remember their tile


def check_tiling_mode(mode: Any) -> str:
    """``mode`` if it is one of :data:`TILING_MODES`, else InvalidInputError."""
    if not isinstance(mode, str) or mode not in TILING_MODES:
        raise InvalidInputError(
            f"tiling must be one of {', '.join(repr(m) for m in TILING_MODES)}, got {mode!r}."
        )
    return mode


def model_input_size(model: Any) -> int:
    """The model's input size in pixels (``model.img_size`` or its encoder's)."""
    size = getattr(model, "img_size", None)
    if size is None:
        size = model.image_encoder.img_size
    return int(size)


def tiling_for(shape: tuple[int, int], img_size: int, mode: str = "auto"
               ) -> tuple[int, int] | None:
    """``(tile, overlap)`` the interactive predictor uses for an (H, W) image, or None
    (the whole image at model scale): tiled when ``mode`` is "auto" and the longest side
    exceeds :data:`TILE_ABOVE` x ``img_size``, in the AIS head's native-scale tiles
    (``img_size`` pixels, overlap ``AIS_TILE_OVERLAP``) through
    :func:`~napari_sam.engine.store.resolve_tiling`."""
    from napari_sam.engine.ais import AIS_TILE_OVERLAP
    from napari_sam.engine.store import resolve_tiling

    if check_tiling_mode(mode) == "off":
        return None
    if max(int(shape[0]), int(shape[1])) <= TILE_ABOVE * int(img_size):
        return None
    tiling = resolve_tiling(shape, img_size, int(img_size), AIS_TILE_OVERLAP)
    if tiling is None:
        return None
    tile, overlap = tiling
    return tile, min(overlap, tile - 1)


@dataclass(frozen=True, eq=False)
class TiledEmbedding:
    """The native-scale tile embeddings of one image (what :func:`embed_tiles` returns,
    :meth:`Predictor.use_embedding <napari_sam.engine.predictor.Predictor.use_embedding>`
    takes).

    Attributes:
      image: (H, W, 3) uint8, the normalised image.
      boxes: one ``(row0, col0, row1, col1)`` per tile (exclusive ends), row-major.
      tiles: each tile's :class:`~napari_sam.engine.cache.EmbeddedImage`.
      tile_size, overlap: the tiling.
    """

    image: np.ndarray
    boxes: tuple[tuple[int, int, int, int], ...]
    tiles: tuple[EmbeddedImage, ...]
    tile_size: int
    overlap: int

    @property
    def original_size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def description(self) -> str:
        """One line for a status bar, e.g. "tiled: 25 tiles of 256 px at native scale"."""
        return (f"tiled: {len(self.boxes)} tiles of {self.tile_size} px at native scale, "
                f"overlap {self.overlap} px")


def embed_tiles(
    predictor: Predictor,
    rgb: np.ndarray,
    tiling: tuple[int, int],
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> TiledEmbedding:
    """Embed each tile of an (H, W, 3) uint8 image through ``predictor.embed`` (cache,
    store, encoder). ``cancel`` is polled before each tile (CancelledError);
    ``progress(done, n_tiles)`` is called after each."""
    from napari_sam.engine.tiles import tile_boxes

    tile, overlap = tiling
    boxes = tuple(tile_boxes(rgb.shape[:2], tile_size=tile, overlap=overlap))
    tiles = []
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        check_cancel(cancel, "Embedding the image's tiles")
        tiles.append(predictor.embed(np.ascontiguousarray(rgb[r0:r1, c0:c1])))
        if progress is not None:
            progress(k + 1, len(boxes))
    return TiledEmbedding(rgb, boxes, tuple(tiles), int(tile), int(overlap))


def _edge_depth(box: tuple[int, int, int, int], shape: tuple[int, int],
                rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Distance in pixels of points (rows, cols) to the nearest *interior* edge of
    ``box`` (edges on the image border do not count: inf when there is none)."""
    r0, c0, r1, c1 = box
    H, W = shape
    depth = np.full(np.broadcast(rows, cols).shape, np.inf)
    if r0 > 0:
        depth = np.minimum(depth, rows - r0)
    if r1 < H:
        depth = np.minimum(depth, r1 - 1 - rows)
    if c0 > 0:
        depth = np.minimum(depth, cols - c0)
    if c1 < W:
        depth = np.minimum(depth, c1 - 1 - cols)
    return depth


def route_prompt(
    boxes: tuple[tuple[int, int, int, int], ...] | list,
    shape: tuple[int, int],
    points: np.ndarray | None,
    box: np.ndarray | None,
) -> int | None:
    """The tile for one prompt: of the tiles holding every point and the whole box,
    the one where the prompt is farthest from an interior edge (the first on ties);
    None when no tile holds it.

    Arguments:
      boxes: tile boxes ``(row0, col0, row1, col1)``, exclusive ends.
      shape: (H, W) of the image.
      points: (N, 2) (row, col), or None.
      box: (4,) (row0, col0, row1, col1) with inclusive corners, or None.
    """
    coords = []
    if points is not None and len(points):
        coords.append(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    if box is not None:
        b = np.asarray(box, dtype=np.float64).reshape(4)
        coords.append(np.array([[b[0], b[1]], [b[2], b[3]]]))
    if not coords:
        raise InvalidInputError("route_prompt needs points or a box.")
    rc = np.floor(np.concatenate(coords))
    # a box clipped to the image may end at row H / column W: the last pixel is H-1 / W-1
    rc = np.minimum(rc, np.array([shape[0] - 1, shape[1] - 1], dtype=np.float64))
    best, best_depth = None, -np.inf
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        rows, cols = rc[:, 0], rc[:, 1]
        if not ((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)).all():
            continue
        depth = float(_edge_depth((r0, c0, r1, c1), shape, rows, cols).min())
        if depth > best_depth:
            best, best_depth = k, depth
    return best


def _innermost(mask: np.ndarray) -> tuple[int, int]:
    """(row, col) of the pixel of a non-empty bool mask farthest from its outside."""
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c)


class TiledPredictor:
    """Predictions on a :class:`TiledEmbedding`, behind ``Predictor.predict``.

    Arguments:
      owner: the :class:`~napari_sam.engine.predictor.Predictor` whose image this is
        (it validates the prompts and holds the refiner choice).
      tiled: the tile embeddings.

    Attributes:
      note: one line on the last prediction's route (which tile, stitched tiles, or
        the whole-image fallback), for a status line.
      last_tiles: indices of the tiles the last prediction used (``[-1]``: the whole
        image at model scale).
    """

    def __init__(self, owner: Predictor, tiled: TiledEmbedding) -> None:
        from napari_sam.engine.predictor import Predictor

        self.owner = owner
        self.tiled = tiled
        # decodes one tile at a time; shares the model, cache and store, never refines
        self._tile = Predictor(owner.model, cache=owner.cache, decoder=owner.decoder.fresh(),
                               refine=False)
        self._tile.store = owner.store
        self._current: int | None = None
        self._logit_tiles: OrderedDict[str, int] = OrderedDict()
        self.note: str = ""
        self.last_tiles: list[int] = []

    # ----------------------------------------------------------------- decoding

    def _use(self, k: int) -> None:
        if self._current == k:
            return
        entry = self.owner.embed(self.tiled.image) if k == _WHOLE else self.tiled.tiles[k]
        self._tile.set_embedding(entry.features, entry.original_size, entry.input_size,
                                 image=entry.image)
        self._current = k

    def _box(self, k: int) -> tuple[int, int, int, int]:
        if k == _WHOLE:
            H, W = self.tiled.original_size
            return 0, 0, H, W
        return self.tiled.boxes[k]

    def _decode(self, k: int, points, labels, box, mask_input, multimask: bool) -> Prediction:
        """Decoder logits of tile ``k`` (full-size tile logits, ``return_logits``)."""
        r0, c0 = self._box(k)[:2]
        self._use(k)
        offset = np.array([r0, c0], dtype=np.float64)
        return self._tile.predict(
            points=None if points is None else points - offset,
            labels=labels,
            box=None if box is None else box - np.r_[offset, offset],
            mask_input=mask_input, multimask=multimask, return_logits=True,
        )

    def _remember(self, logits: np.ndarray, k: int) -> None:
        for c in range(len(logits)):
            self._logit_tiles[image_key(np.ascontiguousarray(logits[c], dtype=np.float32))] = k
        while len(self._logit_tiles) > _REMEMBERED_LOGITS:
            self._logit_tiles.popitem(last=False)

    def _tile_of_logits(self, mask_input: np.ndarray) -> int | None:
        m = np.ascontiguousarray(np.asarray(mask_input, dtype=np.float32).reshape(
            mask_input.shape[-2:]))
        return self._logit_tiles.get(image_key(m))

    # ---------------------------------------------------------------- predict

    def predict_one(
        self,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt (already validated: (N, 2) float points, (N,) labels, (4,) box with
        sorted corners, (1, 4E, 4E) mask_input) -> (C, H, W) stitched decoder logits,
        (C,) predicted IoU, (C, 4E, 4E) low-res logits of the tile it went to."""
        shape = self.tiled.original_size
        k = route_prompt(self.tiled.boxes, shape, points, box)
        routed = _WHOLE if k is None else k
        notes = []
        if mask_input is not None:
            source = self._tile_of_logits(mask_input)
            holds = source is not None and source != _WHOLE and route_prompt(
                [self.tiled.boxes[source]], shape, points, box) == 0
            if source is not None and (source == routed or holds):
                routed = source  # a correction stays in the frame of the logits it refines
            else:
                mask_input = None  # logits of another frame: decode the prompts afresh
                message = ("The mask_input is not from this image's tile that holds the "
                           "prompt, so it was not used; the prompts were decoded afresh.")
                warnings.warn(message, UserWarning, stacklevel=4)
                notes.append("the previous mask was from another tile, so it was not reused")
        k = routed
        if k == _WHOLE:
            message = ("The prompt spans more than one tile of this large image: predicted on "
                       "the whole image at model scale (small objects may be coarse); "
                       "prompt inside one object instead.")
            warnings.warn(message, UserWarning, stacklevel=4)
            notes.insert(0, message)
        pred = self._decode(k, points, labels, box, mask_input, multimask)
        self._remember(pred.logits, k)
        H, W = shape
        n = len(pred.scores)
        logits = np.full((n, H, W), OUTSIDE_LOGIT, dtype=np.float32)
        r0, c0, r1, c1 = self._box(k)
        logits[:, r0:r1, c0:c1] = pred.masks
        used = {k}
        if k != _WHOLE:
            for c in range(n):
                tiles, cut = self._stitch(logits[c], k, points, labels)
                used |= tiles
                if cut and c == int(np.argmax(pred.scores)):
                    notes.append(f"the mask reaches beyond {MAX_STITCHED_TILES} tiles and was "
                                 "cut there; for so large an object switch tiling off")
        self.last_tiles = sorted(used)
        if k == _WHOLE:
            route = "whole image at model scale"
        elif len(used) == 1:
            route = f"tile {k + 1} of {len(self.tiled.boxes)}"
        else:
            route = f"tile {k + 1} of {len(self.tiled.boxes)}, stitched over {len(used)} tiles"
        self.note = "; ".join([f"Predicted in {route}", *notes]) + "."
        return logits, pred.scores, pred.logits

    def _stitch(self, logits: np.ndarray, first: int, points, labels) -> tuple[set[int], bool]:
        """Extend one candidate's (H, W) logits (in place) into the tiles its mask runs
        into; returns the tiles used and whether :data:`MAX_STITCHED_TILES` cut it."""
        shape = self.tiled.original_size
        boxes = self.tiled.boxes
        rows, cols = np.indices(shape, sparse=True)
        owner_depth = np.full(shape, -np.inf, dtype=np.float32)
        r0, c0, r1, c1 = boxes[first]
        owner_depth[r0:r1, c0:c1] = _edge_depth(boxes[first], shape, rows[r0:r1], cols[:, c0:c1])
        used, queue = {first}, [first]
        while queue:
            v = queue.pop(0)
            for u in self._neighbours_reached(logits, v, used):
                if len(used) >= MAX_STITCHED_TILES:
                    return used, True
                ov = _overlap(boxes[v], boxes[u])
                part = logits[ov[0]:ov[2], ov[1]:ov[3]] > 0
                if not part.any():
                    continue
                pr, pc = _innermost(part)
                seed = np.array([[pr + ov[0], pc + ov[1]]], dtype=np.float64)
                seed_labels = np.array([1])
                if points is not None and len(points):
                    keep = [i for i, p in enumerate(points)
                            if route_prompt([boxes[u]], shape, p[None], None) == 0]
                    seed = np.concatenate([seed, points[keep]])
                    seed_labels = np.concatenate([seed_labels, labels[keep]])
                pred = self._decode(u, seed, seed_labels, None, None, multimask=True)
                ur0, uc0, ur1, uc1 = boxes[u]
                local = (ov[0] - ur0, ov[1] - uc0, ov[2] - ur0, ov[3] - uc0)
                agree = [_iou(m[local[0]:local[2], local[1]:local[3]] > 0, part)
                         for m in pred.masks]
                best = pred.masks[int(np.argmax(agree))]
                depth = _edge_depth(boxes[u], shape, rows[ur0:ur1], cols[:, uc0:uc1])
                region = owner_depth[ur0:ur1, uc0:uc1]
                deeper = depth > region
                logits[ur0:ur1, uc0:uc1][deeper] = best[deeper]
                region[deeper] = depth[deeper]
                used.add(u)
                queue.append(u)
        return used, False

    def _neighbours_reached(self, logits: np.ndarray, v: int, used: set[int]) -> list[int]:
        """Unused tiles across the interior edges of tile ``v`` that the mask
        (``logits > 0``) reaches."""
        H, W = self.tiled.original_size
        r0, c0, r1, c1 = self.tiled.boxes[v]
        m = EDGE_MARGIN
        sides = []  # for each touched edge: does a tile box extend beyond it
        if r0 > 0 and (logits[r0:r0 + m, c0:c1] > 0).any():
            sides.append(lambda b: b[0] < r0)
        if r1 < H and (logits[r1 - m:r1, c0:c1] > 0).any():
            sides.append(lambda b: b[2] > r1)
        if c0 > 0 and (logits[r0:r1, c0:c0 + m] > 0).any():
            sides.append(lambda b: b[1] < c0)
        if c1 < W and (logits[r0:r1, c1 - m:c1] > 0).any():
            sides.append(lambda b: b[3] > c1)
        out = []
        for u, b in enumerate(self.tiled.boxes):
            if u in used or _overlap(b, (r0, c0, r1, c1)) is None:
                continue
            if any(beyond(b) for beyond in sides):
                out.append(u)
        return out


def _overlap(a, b) -> tuple[int, int, int, int] | None:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    return (r0, c0, r1, c1) if r1 > r0 and c1 > c0 else None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
