"""Everything-mode on images larger than one model input: overlapping tiles.

SAM sees an image resized so that its longest side fits the model input (1024
px for the official models), so small objects in a large image vanish. Here the
image is cut into overlapping tiles of ``tile_size`` pixels (default 1024, i.e.
the model sees each tile at its native resolution), every tile is segmented
on its own (one embedding alive at a time), and the results are stitched:

1. **Cut pieces.** A mask touching an *interior* tile edge (an edge that is not
   the image border) may be an object cut by the tile. When a mask from another
   tile contains it (``contain_thresh`` of its pixels), it is dropped: that tile
   saw more of the object.
2. **Objects larger than the overlap** are cut in every tile. Pieces from
   different tiles that both touch an interior edge and agree inside the region
   the two tiles share (IoU there >= ``merge_iou``) are merged into one mask.
3. **Duplicates.** An object lying in an overlap is found whole by both tiles;
   of two masks from different tiles with mask IoU > ``dup_iou`` the one with
   the higher predicted IoU is kept.

Records returned by :func:`generate_tiled` are in full-image coordinates and
hold *cropped* masks so memory scales with the objects, not with the image:

* ``segmentation``: (row1 - row0, col1 - col0) bool mask inside ``bbox_rc``.
* ``bbox_rc``: ``[row0, col0, row1, col1]`` with exclusive ``row1, col1``.
* ``bbox``: SAM-style ``[x, y, w, h]`` (``w`` = last column - first column).
* ``area``, ``predicted_iou``, ``stability_score`` (when the generator gives them).
* ``point_coords``: ``[[x, y]]`` image pixel coordinates of the prompt, when given.
* ``tile_box``: ``[row0, col0, row1, col1]`` of the tile the mask came from
  (of its best piece for merged masks); ``n_pieces``: tiles merged into it.
* ``crop_box``: ``[x, y, w, h]`` in the image of the crop inside the tile,
  when the generator gives one.

Paint them with :func:`napari_sam.engine.everything.records_to_labels`.

Parameters are checked before any tile is read
(:class:`~napari_sam.engine.everything_settings.TilingSettings`): ``tile_size``
at least 16 px, ``0 <= overlap < tile_size``, ``edge_margin >= 0`` and the
three fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from napari_sam.engine.everything import record_mask
from napari_sam.engine.everything_settings import MIN_TILE_SIZE, TilingSettings
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.errors import CancelledError, InvalidInputError

__all__ = [
    "MIN_TILE_SIZE",
    "ProgressiveTileGenerator",
    "TileGenerator",
    "generate_tiled",
    "iter_tiled",
    "tile_boxes",
]


class TileGenerator(Protocol):
    """What :func:`generate_tiled` needs: records of one (h, w, 3) uint8 tile, with
    ``segmentation`` (full-tile bool mask, RLE, or a cropped mask with ``bbox_rc``)
    and optionally ``predicted_iou``, ``stability_score``, ``point_coords``,
    ``crop_box``."""

    def generate(self, rgb: np.ndarray) -> list[dict[str, Any]]: ...


@runtime_checkable
class ProgressiveTileGenerator(Protocol):
    """A tile generator that reports progress while it works and can be cancelled
    (:class:`~napari_sam.engine.everything.AutomaticMaskGenerator`): ``iter_tile``
    yields progress objects and returns the tile's records. Preferred over
    ``generate`` when present."""

    def iter_tile(
        self, rgb: np.ndarray, cancel: Callable[[], bool] | None = None
    ) -> Generator[Any, None, list[dict[str, Any]]]: ...


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    k = math.ceil((n - tile) / (tile - overlap)) + 1
    return [round(i * (n - tile) / (k - 1)) for i in range(k)]


def tile_boxes(
    shape: tuple[int, int], tile_size: int = 1024, overlap: int = 128
) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles ``(row0, col0, row1, col1)`` covering an (H, W) image, row-major.

    Along each axis, the fewest tiles of ``tile_size`` pixels (or the whole axis
    when it is shorter) whose neighbours overlap by at least ``overlap``
    pixels, spread evenly so the first starts at 0 and the last ends at the border.
    ``tile_size`` is at least 16 (``MIN_TILE_SIZE``).
    """
    settings = TilingSettings(tile_size=tile_size, overlap=overlap)
    tile_size, overlap = settings.tile_size, settings.overlap
    H, W = int(shape[0]), int(shape[1])
    if H <= 0 or W <= 0:
        raise InvalidInputError(f"Image shape must be positive, got {(H, W)}.")
    rows, cols = _starts(H, tile_size, overlap), _starts(W, tile_size, overlap)
    return [(r, c, min(r + tile_size, H), min(c + tile_size, W)) for r in rows for c in cols]


class _Piece:
    """One mask in image coordinates (cropped to its box)."""

    __slots__ = ("mask", "box", "tile", "cut", "area", "score", "stability", "point", "alive",
                 "n_pieces", "tile_box", "crop_box")

    def __init__(self, mask, box, tile, cut, score, stability, point, tile_box, crop_box=None):
        self.mask, self.box, self.tile, self.cut = mask, box, tile, cut
        self.area = int(mask.sum())
        self.score, self.stability, self.point = score, stability, point
        self.alive, self.n_pieces, self.tile_box = True, 1, tile_box
        self.crop_box = crop_box


def _intersection(a: _Piece, b: _Piece, region=None) -> tuple[int, int, int]:
    """Pixels of a & b, of a, of b inside ``region`` (default: everywhere)."""
    r0, c0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    r1, c1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if region is not None:
        r0, c0 = max(r0, region[0]), max(c0, region[1])
        r1, c1 = min(r1, region[2]), min(c1, region[3])
    if r1 <= r0 or c1 <= c0:
        return 0, 0, 0
    sa = a.mask[r0 - a.box[0] : r1 - a.box[0], c0 - a.box[1] : c1 - a.box[1]]
    sb = b.mask[r0 - b.box[0] : r1 - b.box[0], c0 - b.box[1] : c1 - b.box[1]]
    return int(np.logical_and(sa, sb).sum()), int(sa.sum()), int(sb.sum())


def _area_in(p: _Piece, region) -> int:
    r0, c0 = max(p.box[0], region[0]), max(p.box[1], region[1])
    r1, c1 = min(p.box[2], region[2]), min(p.box[3], region[3])
    if r1 <= r0 or c1 <= c0:
        return 0
    return int(p.mask[r0 - p.box[0] : r1 - p.box[0], c0 - p.box[1] : c1 - p.box[1]].sum())


def _box_pairs(pieces: list[_Piece]) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of pieces from different tiles whose boxes overlap."""
    if len(pieces) < 2:
        return []
    boxes = np.array([p.box for p in pieces], dtype=np.int64)
    tiles = np.array([p.tile for p in pieces])
    order = np.argsort(boxes[:, 0], kind="stable")
    r0_sorted = boxes[order, 0]
    pairs = []
    for k, i in enumerate(order):
        end = np.searchsorted(r0_sorted, boxes[i, 2], side="left")
        js = order[k + 1 : end]
        if js.size == 0:
            continue
        ok = (boxes[js, 1] < boxes[i, 3]) & (boxes[i, 1] < boxes[js, 3]) & (tiles[js] != tiles[i])
        pairs.extend((min(i, j), max(i, j)) for j in js[ok].tolist())
    return sorted(set(pairs))


def _merge(group: list[_Piece]) -> _Piece:
    r0 = min(p.box[0] for p in group)
    c0 = min(p.box[1] for p in group)
    r1 = max(p.box[2] for p in group)
    c1 = max(p.box[3] for p in group)
    mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    for p in group:
        mask[p.box[0] - r0 : p.box[2] - r0, p.box[1] - c0 : p.box[3] - c0] |= p.mask
    best = max(group, key=lambda p: (p.score, p.area))
    merged = _Piece(mask, (r0, c0, r1, c1), best.tile, False, best.score, best.stability,
                    best.point, best.tile_box, best.crop_box)
    merged.n_pieces = sum(p.n_pieces for p in group)
    return merged


def generate_tiled(
    generator: TileGenerator | ProgressiveTileGenerator,
    image: np.ndarray,
    progress: Callable[[int, int], Any] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Everything-mode over overlapping tiles of a large image: :func:`iter_tiled` run
    to the end.

    ``progress`` is called as ``progress(done_tiles, n_tiles)``; ``options`` are
    the keyword arguments of :func:`iter_tiled` (``tile_size``, ``overlap``,
    ``contrast_limits``, ``channel_axis``, ``cancel``, ``edge_margin``,
    ``contain_thresh``, ``merge_iou``, ``dup_iou``), documented there.

    Returns:
      records in full-image coordinates with cropped masks (module docstring).
    """
    steps = iter_tiled(generator, image, **options)
    try:
        while True:
            done_tile, n_tiles, step = next(steps)
            if step is None and progress is not None:
                progress(done_tile, n_tiles)
    except StopIteration as stop:
        return stop.value


def iter_tiled(
    generator: TileGenerator | ProgressiveTileGenerator,
    image: np.ndarray,
    tile_size: int = 1024,
    overlap: int = 128,
    contrast_limits: tuple[float, float] | None = None,
    channel_axis: int | None = None,
    cancel: Callable[[], bool] | None = None,
    edge_margin: int = 2,
    contain_thresh: float = 0.9,
    merge_iou: float = 0.5,
    dup_iou: float = 0.5,
) -> Generator[tuple[int, int, Any], None, list[dict[str, Any]]]:
    """Everything-mode over overlapping tiles of a large image, as a generator.

    Yields ``(k, n_tiles, step)``: each progress object ``step`` of tile ``k``
    (0-based) that a :class:`ProgressiveTileGenerator` reports, and
    ``(k + 1, n_tiles, None)`` when tile ``k`` is done. Returns the records
    (``StopIteration.value``; ``yield from`` hands them over).
    :func:`generate_tiled` runs it to the end.

    Arguments:
      generator: an :class:`~napari_sam.engine.everything.AutomaticMaskGenerator`
        or any :class:`TileGenerator` (an object whose ``generate(tile)`` takes an
        (h, w, 3) uint8 tile and returns records with ``segmentation`` (full-tile
        bool mask, RLE, or a cropped mask with ``bbox_rc``) and optionally
        ``predicted_iou``, ``stability_score``, ``point_coords``, ``crop_box``).
        A :class:`ProgressiveTileGenerator` (``AutomaticMaskGenerator``) is run
        through ``iter_tile``: each tile in one piece (it does not tile the
        tiles), cropped masks handed over.
      image: (H, W) or (H, W, C) image data (numpy, memmap or dask; tiles are
        read one at a time), or channels on ``channel_axis``.
      tile_size, overlap: see :func:`tile_boxes` (``tile_size >= 16``). The
        overlap should exceed the size of typical objects, so each is whole in
        some tile.
      contrast_limits: intensity range mapped to 0..255 for every tile; when
        None, the image's global min / max (uint8 data is used as is), so all
        tiles share one mapping.
      cancel: returns True to stop (:class:`~napari_sam.errors.CancelledError`).
      edge_margin: a mask within this many pixels of an interior tile edge
        counts as touching it.
      contain_thresh, merge_iou, dup_iou: see the module docstring.

    Returns:
      records in full-image coordinates with cropped masks (module docstring).

    Raises:
      InvalidInputError: bad parameters, or an image that is not 2D / RGB(A) /
        channels on ``channel_axis``, or holds NaN or infinite values (checked
        before the first tile).
    """
    settings = TilingSettings(tile_size=tile_size, overlap=overlap, edge_margin=edge_margin,
                              contain_thresh=contain_thresh, merge_iou=merge_iou,
                              dup_iou=dup_iou)
    data = image
    if not hasattr(data, "ndim") or not hasattr(data, "shape"):
        data = np.asarray(data)
    if channel_axis is not None:
        if data.ndim != 3 or not -data.ndim <= int(channel_axis) < data.ndim:
            raise InvalidInputError(
                f"channel_axis={channel_axis} needs a 3D image with that axis, got shape "
                f"{tuple(data.shape)}."
            )
        data = np.moveaxis(data, int(channel_axis), -1)
    elif data.ndim == 3 and data.shape[-1] not in (1, 3, 4):
        raise InvalidInputError(
            f"generate_tiled got a 3D array of shape {tuple(data.shape)}, which is neither "
            "RGB(A) (H, W, 3|4) nor grayscale. If it is a stack (Z, Y, X), pass one 2D slice, "
            "e.g. image[z]; if one axis holds channels, pass channel_axis=<that axis>."
        )
    if data.ndim not in (2, 3):
        raise InvalidInputError(
            f"generate_tiled needs a 2D image (H, W) or (H, W, C), got shape "
            f"{tuple(data.shape)}; pass one 2D slice of a stack, e.g. image[t, z]."
        )
    H, W = int(data.shape[0]), int(data.shape[1])
    if np.dtype(data.dtype).kind not in "biuf":
        to_rgb_uint8(np.asarray(data[:1, :1]))  # raises the dtype's message
    if np.dtype(data.dtype).kind == "f":  # NaN / inf, reported for the whole image
        lo, hi = float(np.min(data)), float(np.max(data))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            n_nan = int(np.isnan(data).sum())
            n_inf = int(np.isinf(data).sum())
            raise InvalidInputError(
                f"The image contains {n_nan} NaN and {n_inf} infinite values; replace them "
                "first, e.g. np.nan_to_num(image, nan=0.0, posinf=..., neginf=...)."
            )
        if contrast_limits is None:
            contrast_limits = (lo, hi)
    elif contrast_limits is None and np.dtype(data.dtype) != np.uint8:
        contrast_limits = (float(np.min(data)), float(np.max(data)))
    # dtype, channels and contrast limits: checked on one pixel before any work
    to_rgb_uint8(np.asarray(data[:1, :1]), contrast_limits=contrast_limits,
                 channel_axis=-1 if channel_axis is not None else None)
    edge_margin = settings.edge_margin
    contain_thresh, merge_iou, dup_iou = (settings.contain_thresh, settings.merge_iou,
                                          settings.dup_iou)
    tiles = tile_boxes((H, W), settings.tile_size, settings.overlap)

    pieces: list[_Piece] = []
    for t, (tr0, tc0, tr1, tc1) in enumerate(tiles):
        if cancel is not None and cancel():
            raise CancelledError("Tiled everything-mode was cancelled.")
        tile = np.asarray(data[tr0:tr1, tc0:tc1])
        rgb = to_rgb_uint8(tile, contrast_limits=contrast_limits,
                           channel_axis=-1 if channel_axis is not None else None)
        if isinstance(generator, ProgressiveTileGenerator):
            steps = generator.iter_tile(rgb, cancel)
            try:
                while True:
                    yield t, len(tiles), next(steps)
            except StopIteration as stop:
                records = stop.value
        else:
            records = generator.generate(rgb)
        th, tw = tr1 - tr0, tc1 - tc0
        for rec in records:
            (br0, bc0, _, _), local = record_mask(rec, (th, tw))
            rows = np.flatnonzero(local.any(axis=1))
            if rows.size == 0:
                continue
            cols = np.flatnonzero(local.any(axis=0))
            lr0, lr1, lc0, lc1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            crop = np.ascontiguousarray(local[lr0:lr1, lc0:lc1])
            lr0, lr1, lc0, lc1 = lr0 + br0, lr1 + br0, lc0 + bc0, lc1 + bc0  # tile frame
            cut = (
                (tr0 > 0 and lr0 < edge_margin)
                or (tc0 > 0 and lc0 < edge_margin)
                or (tr1 < H and lr1 > th - edge_margin)
                or (tc1 < W and lc1 > tw - edge_margin)
            )
            point = rec.get("point_coords")
            if point is not None:
                point = [[float(point[0][0]) + tc0, float(point[0][1]) + tr0]]
            crop_box = rec.get("crop_box")
            if crop_box is not None:
                x, y, w, h = (int(v) for v in crop_box)
                crop_box = [x + tc0, y + tr0, w, h]
            pieces.append(
                _Piece(
                    crop,
                    (int(lr0 + tr0), int(lc0 + tc0), int(lr1 + tr0), int(lc1 + tc0)),
                    t,
                    bool(cut),
                    float(rec.get("predicted_iou", 1.0)),
                    rec.get("stability_score"),
                    point,
                    [tr0, tc0, tr1, tc1],
                    crop_box,
                )
            )
        del records
        yield t + 1, len(tiles), None

    pieces = _stitch(pieces, tiles, contain_thresh, merge_iou, dup_iou)
    return [_to_record(p) for p in pieces]


def _stitch(pieces, tiles, contain_thresh, merge_iou, dup_iou) -> list[_Piece]:
    # 1. drop cut pieces contained in a mask from another tile
    pairs = _box_pairs(pieces)
    for i, j in pairs:
        a, b = pieces[i], pieces[j]
        inter, _, _ = _intersection(a, b)
        for small, big in ((a, b), (b, a)):
            if (
                small.cut
                and small.alive
                and big.alive
                and inter >= contain_thresh * small.area
                and (big.area > small.area or (big.area == small.area and not big.cut))
            ):
                small.alive = False
    pieces = [p for p in pieces if p.alive]

    # 2. merge cut pieces of one object that agree where their tiles overlap
    parent = list(range(len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in _box_pairs(pieces):
        a, b = pieces[i], pieces[j]
        if not (a.cut and b.cut):
            continue
        ta, tb = tiles[a.tile], tiles[b.tile]
        shared = (max(ta[0], tb[0]), max(ta[1], tb[1]), min(ta[2], tb[2]), min(ta[3], tb[3]))
        inter, in_a, in_b = _intersection(a, b, shared)
        if inter and inter >= merge_iou * (in_a + in_b - inter):
            parent[find(i)] = find(j)
    groups: dict[int, list[_Piece]] = {}
    for i, p in enumerate(pieces):
        groups.setdefault(find(i), []).append(p)
    pieces = [g[0] if len(g) == 1 else _merge(g) for g in groups.values()]

    # 3. greedy NMS on mask IoU between pieces of different tiles
    order = sorted(range(len(pieces)), key=lambda k: -pieces[k].score)
    rank = {k: r for r, k in enumerate(order)}
    pairs = sorted(_box_pairs(pieces), key=lambda ij: (min(rank[ij[0]], rank[ij[1]]),
                                                        max(rank[ij[0]], rank[ij[1]])))
    for i, j in pairs:
        hi, lo = (i, j) if rank[i] < rank[j] else (j, i)
        if not (pieces[hi].alive and pieces[lo].alive):
            continue
        inter, _, _ = _intersection(pieces[hi], pieces[lo])
        union = pieces[hi].area + pieces[lo].area - inter
        if union and inter / union > dup_iou:
            pieces[lo].alive = False
    return [pieces[k] for k in order if pieces[k].alive]


def _to_record(p: _Piece) -> dict[str, Any]:
    r0, c0, r1, c1 = p.box
    rec = {
        "segmentation": p.mask,
        "bbox_rc": [r0, c0, r1, c1],
        "bbox": [c0, r0, c1 - 1 - c0, r1 - 1 - r0],
        "area": p.area,
        "predicted_iou": p.score,
        "tile_box": p.tile_box,
        "n_pieces": p.n_pieces,
    }
    if p.stability is not None:
        rec["stability_score"] = float(p.stability)
    if p.point is not None:
        rec["point_coords"] = p.point
    if p.crop_box is not None:
        rec["crop_box"] = p.crop_box
    return rec
