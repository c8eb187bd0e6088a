"""Image embeddings on disk: a chunked zarr (v3) store, one chunk per plane or tile.

Embedding an image is the slow step (seconds per plane for ViT-B on a CPU);
a stack of 100 planes takes minutes, and every restart used to pay it again.
:func:`iter_embed` computes the embedding of every plane of an image (a 2D
image, or each plane of a stack's leading axes) and of every tile where tiling
applies, and writes each one to disk as soon as it is computed: one embedding
is alive at a time, so memory does not grow with the stack.
:class:`EmbeddingStore` reads them back one at a time
(``Predictor(model, store=...)`` consults it before running the encoder).

Layout of a store (a zarr v3 group, normally ``IMAGE.sam.zarr`` beside the
image, see :func:`store_path_for`):

* attributes ``napari_sam_store``: the format version, the
  :class:`StoreSignature` and the torch dtype of the features;
* ``features``: (N, C, E, E) float array, chunks (1, C, E, E): entry ``i``'s
  encoder output (``EmbeddedImage.features[0]``);
* ``geometry``: (N, 7) int64, one row per entry: flat plane number (C order of
  the stack axes), the entry's box in the plane ``row0, col0, row1, col1``
  (exclusive ends; the whole plane, or a tile of
  :func:`~napari_sam.engine.tiles.tile_boxes`), and the model-input size
  ``(h, w)`` (:meth:`ImageTransform.input_size`); the original size of the
  entry is ``(row1 - row0, col1 - col0)``;
* ``keys``: (N, 16) uint8, chunks (1, 16): the
  :func:`~napari_sam.engine.cache.image_key` digest of the entry's normalised
  (h, w, 3) uint8 pixels. It is written after the entry's features, so an entry
  whose key is all zero was never finished (zarr writes each chunk atomically):
  an interrupted run resumes by computing exactly those.

Entries are ordered plane by plane: the whole plane first, then its tiles
(row-major). Lookups go by the key of the normalised pixels, so an embedding is
only ever served for exactly the pixels it was computed from.

The signature (model name and weights hash, image checksum, normalisation,
tiling) decides whether a store can be reused: :func:`iter_embed` on a store
with the same signature only computes the missing entries (none: nothing is
written), and refuses one made for anything else with
:class:`~napari_sam.errors.StoreMismatchError` naming what differs, unless
``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.engine.cache import EmbeddedImage, image_key
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.errors import CancelledError, InvalidInputError, StoreMismatchError

__all__ = [
    "FORMAT_VERSION",
    "STORE_SUFFIX",
    "EmbedProgress",
    "EmbedResult",
    "EmbeddingStore",
    "StoreSignature",
    "embed_to_store",
    "find_store",
    "image_checksum",
    "iter_embed",
    "iter_planes",
    "iter_precompute",
    "plan_entries",
    "resolve_tiling",
    "store_path_for",
    "use_store_beside",
    "weights_hash",
]

#: version of the on-disk layout (attributes ``napari_sam_store.version``)
FORMAT_VERSION = 1
#: suffix of a store beside its image: ``cells.tif`` -> ``cells.tif.sam.zarr``
STORE_SUFFIX = ".sam.zarr"
#: the attribute that marks a zarr group as a napari-sam embedding store
_ATTR = "napari_sam_store"
_KEY_BYTES = 16  # image_key: blake2b, 128 bits


# ----------------------------------------------------------------------------- signature


#: model -> (what its tensors looked like when hashed, the hash): see weights_hash
_WEIGHT_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_hash(model: Any) -> str:
    """``"blake2b:<hex>"`` of a model's state dict (names, dtypes, shapes and values).

    Identifies the weights whatever file or name they were loaded from; any
    change to a parameter or buffer changes it. The hash is remembered per model
    object until one of its tensors is replaced or modified in place (torch's
    version counter), so attaching stores to predictors of one model costs one pass
    over the weights.
    """
    import torch

    state = model.state_dict()
    stamp = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    try:
        cached = _WEIGHT_HASHES.get(model)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    digest = "blake2b:" + h.hexdigest()
    with contextlib.suppress(TypeError):  # not weak-referenceable: not remembered
        _WEIGHT_HASHES[model] = (stamp, digest)
    return digest


def image_checksum(data: Any) -> str:
    """``"blake2b:<hex>"`` of an image array's dtype, shape and pixels (as stored).

    ``data`` may be any array-like with ``shape``, ``dtype`` and indexing (numpy,
    dask, zarr): it is read one leading-axis slice at a time (the bytes hashed are
    the C-order bytes of the whole array either way).
    """
    shape = tuple(int(n) for n in data.shape)
    dtype = np.dtype(data.dtype)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{dtype.str}{shape}".encode())
    for index in np.ndindex(*shape[:1]) if len(shape) > 2 else [()]:
        part = np.ascontiguousarray(np.asarray(data[index] if index else data), dtype=dtype)
        h.update(memoryview(part.reshape(-1)).cast("B"))
    return "blake2b:" + h.hexdigest()


@dataclass(frozen=True)
class StoreSignature:
    """What a store's embeddings were computed from; two stores are interchangeable
    exactly when their signatures are equal (the model *name* is informative only:
    the same weights under another name or path are the same model).

    Attributes:
      model_name: the model as the user named it (zoo name or checkpoint path).
      weights: :func:`weights_hash` of the model.
      image: :func:`image_checksum` of the image array.
      image_shape: the array's shape, ``(*stack, H, W[, C])``.
      normalisation: how planes became (H, W, 3) uint8:
        ``{"contrast_limits": [lo, hi] | None, "rgb": bool}`` (see
        :func:`~napari_sam.engine.image.to_rgb_uint8`).
      tiling: ``{"tile_size": int | "auto" | None, "overlap": int | None}`` as
        requested (see :func:`resolve_tiling`).
    """

    model_name: str
    weights: str
    image: str
    image_shape: tuple[int, ...]
    normalisation: dict[str, Any]
    tiling: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_shape"] = list(self.image_shape)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StoreSignature:
        return cls(
            model_name=str(obj["model_name"]), weights=str(obj["weights"]),
            image=str(obj["image"]), image_shape=tuple(int(n) for n in obj["image_shape"]),
            normalisation=dict(obj["normalisation"]), tiling=dict(obj["tiling"]),
        )

    def differences(self, other: StoreSignature) -> list[str]:
        """What differs between this store's signature and ``other`` (the one asked
        for), as short phrases; empty when they match."""
        out = []
        if self.weights != other.weights:
            out.append(f"model: the store holds {self.model_name!r} ({_short(self.weights)}), "
                       f"this is {other.model_name!r} ({_short(other.weights)})")
        if self.image_shape != other.image_shape:
            out.append(f"image: the store holds an image of shape {self.image_shape}, "
                       f"this one has shape {other.image_shape}")
        elif self.image != other.image:
            out.append(f"image: same shape {self.image_shape} but other pixels (checksum "
                       f"{_short(self.image)} in the store, {_short(other.image)} here)")
        for name in ("normalisation", "tiling"):
            mine, asked = getattr(self, name), getattr(other, name)
            if mine != asked:
                out.append(f"{name}: store {_compact(mine)}, asked {_compact(asked)}")
        return out


def _short(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"{algo} {hexdigest[:12]}" if hexdigest else digest


def _compact(obj: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(obj.items()))


def resolve_tiling(
    shape: tuple[int, int], img_size: int, tile_size: int | str | None, overlap: int | None
) -> tuple[int, int] | None:
    """``(tile, overlap)`` for an (H, W) plane, or None when the plane is not tiled.

    ``tile_size``: ``"auto"`` follows everything-mode's own rule
    (:func:`~napari_sam.engine.everything_settings.auto_tile_size`: planes longer
    than 3 x the model input get tiles of 2 x the model input); an int tiles planes
    larger than it; None never tiles. ``overlap`` defaults to 1/8 of the tile, as
    everything-mode's automatic tiles.
    """
    from napari_sam.engine.everything_settings import auto_tile_size

    if tile_size is None:
        return None
    if tile_size == "auto":
        tile = auto_tile_size(shape, img_size)
    else:
        tile = int(tile_size) if max(int(shape[0]), int(shape[1])) > int(tile_size) else None
    if tile is None:
        return None
    return tile, (tile // 8 if overlap is None else int(overlap))


def _check_tiling(tile_size: Any, overlap: Any) -> None:
    from napari_sam.engine.everything_settings import MIN_TILE_SIZE

    if tile_size not in (None, "auto") and (
        isinstance(tile_size, bool) or not isinstance(tile_size, int | np.integer)
        or tile_size < MIN_TILE_SIZE
    ):
        raise InvalidInputError(
            f"tile_size must be 'auto', None or an integer >= {MIN_TILE_SIZE}, got {tile_size!r}."
        )
    if overlap is not None:
        if isinstance(overlap, bool) or not isinstance(overlap, int | np.integer) or overlap < 0:
            raise InvalidInputError(f"overlap must be an integer >= 0, got {overlap!r}.")
        if isinstance(tile_size, int | np.integer) and overlap >= tile_size:
            raise InvalidInputError(
                f"overlap ({overlap}) must be smaller than tile_size ({tile_size})."
            )


def plan_entries(
    stack_shape: tuple[int, ...], plane_shape: tuple[int, int], img_size: int,
    tile_size: int | str | None = "auto", overlap: int | None = None,
    transform: Any = None,
) -> np.ndarray:
    """The store's entries for an image: (N, 7) int64 ``geometry`` rows (see the
    module docstring), plane by plane, the whole plane first, then its tiles.
    ``transform``: the model's image convention (default SAM's, ``ImageTransform``)."""
    from napari_sam.engine.tiles import tile_boxes
    from napari_sam.engine.transforms import ImageTransform

    transform = transform or ImageTransform(img_size)
    H, W = int(plane_shape[0]), int(plane_shape[1])
    boxes = [(0, 0, H, W)]
    tiling = resolve_tiling((H, W), img_size, tile_size, overlap)
    if tiling is not None:
        tile, over = tiling
        boxes += tile_boxes((H, W), tile_size=tile, overlap=min(over, tile - 1))
    rows = []
    for plane in range(int(np.prod(stack_shape, dtype=np.int64))):
        for r0, c0, r1, c1 in boxes:
            rows.append((plane, r0, c0, r1, c1, *transform.input_size((r1 - r0, c1 - c0))))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 7)


# ----------------------------------------------------------------------------- the store


def store_path_for(image_path: str | os.PathLike) -> Path:
    """Where the store of an image file lives by default: ``cells.tif`` ->
    ``cells.tif.sam.zarr`` in the same folder."""
    path = Path(image_path)
    return path.with_name(path.name + STORE_SUFFIX)


def find_store(image_path: str | os.PathLike) -> EmbeddingStore | None:
    """The store beside an image file (:func:`store_path_for`), or None when there is
    none; a folder of that name that is not a store raises InvalidInputError."""
    path = store_path_for(image_path)
    if not path.exists():
        return None
    return EmbeddingStore.open(path)


def use_store_beside(predictor: Any, image_path: str | os.PathLike) -> str | None:
    """Make ``predictor`` read the store beside an image file, if there is a usable one.

    Returns a one-line remark for the user: which store is read, or why the one found
    is not used (not a store, another format, made with other weights: then the
    encoder runs as if there were none; a store is never used for another model).
    None when there is no store beside the image.
    """
    path = store_path_for(image_path)
    if not path.exists():
        return None
    try:
        store = EmbeddingStore.open(path)
        predictor.use_store(store)
    except InvalidInputError as err:  # StoreMismatchError included
        return f"not using the embeddings beside the image: {err}"
    return f"reading embeddings from {path} ({int(store.done().sum())} of {len(store)} stored)"


class EmbeddingStore:
    """A store on disk (read side), opened with :meth:`open`; written by :func:`iter_embed`.

    Reads one entry at a time: :meth:`lookup` (by the key of the normalised pixels),
    :meth:`read` (by entry number) and :meth:`plane` (a plane's whole-plane entry)
    return an :class:`~napari_sam.engine.cache.EmbeddedImage` with CPU features
    (1, C, E, E).
    """

    def __init__(self, group: Any, path: Path) -> None:
        meta = dict(group.attrs[_ATTR])
        self.path = path
        self._group = group
        self.signature = StoreSignature.from_json(meta["signature"])
        self.geometry: np.ndarray = np.asarray(group["geometry"][:], dtype=np.int64)
        self._dtype = meta.get("features_dtype")
        self._index: dict[str, int] | None = None
        self.lookups = 0
        self.hits = 0

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> EmbeddingStore:
        """Open a store; InvalidInputError when ``path`` is missing, not a zarr group,
        not a napari-sam store, or of another format version."""
        group = _open_group(Path(path), mode)
        if group is None:
            raise InvalidInputError(
                f"{path} is not a napari-sam embedding store (make one with "
                "`napari-sam embed IMAGE --out STORE`)."
            )
        version = dict(group.attrs[_ATTR]).get("version")
        if version != FORMAT_VERSION:
            raise InvalidInputError(
                f"{path} is an embedding store of format version {version}, this napari-sam "
                f"reads version {FORMAT_VERSION}; recompute it with `napari-sam embed ... "
                "--overwrite`."
            )
        return cls(group, Path(path))

    def __len__(self) -> int:
        return len(self.geometry)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, entries={len(self)}, "
                f"done={int(self.done().sum())})")

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The stack axes of the image the store was made for (``()`` for a 2D image)."""
        shape = self.signature.image_shape
        n = len(shape) - (3 if self.signature.normalisation.get("rgb") else 2)
        return tuple(shape[:n])

    def done(self) -> np.ndarray:
        """(N,) bool: which entries are complete (their key is written)."""
        if "keys" not in self._group:
            return np.zeros(len(self), dtype=bool)
        return np.asarray(self._group["keys"][:]).any(axis=1)

    @property
    def complete(self) -> bool:
        """Whether every entry is written."""
        return bool(self.done().all())

    def _keys(self, refresh: bool = False) -> dict[str, int]:
        """key -> entry of the written entries (read once; ``refresh`` rereads the keys of
        a store that was not complete, which a running ``embed`` may be filling)."""
        if self._index is None or (refresh and len(self._index) < len(self)):
            keys = np.asarray(self._group["keys"][:])
            self._index = {bytes(k).hex(): i for i, k in enumerate(keys) if k.any()}
        return self._index

    def check_model(self, model: Any) -> None:
        """StoreMismatchError unless ``model`` has the weights the store was made with."""
        found = weights_hash(model)
        if found != self.signature.weights:
            raise StoreMismatchError(
                f"{self.path} was made for model {self.signature.model_name!r} "
                f"({_short(self.signature.weights)}), not for this model ({_short(found)}); "
                "use that model, or recompute the store with `napari-sam embed ... --overwrite`."
            )

    def lookup(self, key: str) -> EmbeddedImage | None:
        """The entry whose normalised pixels have :func:`image_key` ``key``, or None."""
        self.lookups += 1
        index = self._keys().get(key)
        if index is None:
            index = self._keys(refresh=True).get(key)
        if index is None:
            return None
        self.hits += 1
        return self.read(index)

    def read(self, index: int) -> EmbeddedImage:
        """Entry ``index`` (reads one chunk); InvalidInputError if it was never written."""
        import torch

        if not 0 <= int(index) < len(self):
            raise InvalidInputError(f"entry {index} is out of range: the store has {len(self)}.")
        if "features" not in self._group or not self._group["keys"][int(index)].any():
            raise InvalidInputError(
                f"entry {index} of {self.path} was never computed; run `napari-sam embed` "
                "again to finish the store."
            )
        _plane, r0, c0, r1, c1, h, w = (int(v) for v in self.geometry[int(index)])
        features = torch.from_numpy(np.asarray(self._group["features"][int(index)]))[None]
        if self._dtype is not None:
            features = features.to(getattr(torch, self._dtype))
        return EmbeddedImage(features, (h, w), (r1 - r0, c1 - c0))

    def plane(self, index: tuple[int, ...] | int = ()) -> EmbeddedImage:
        """The whole-plane embedding of stack index ``index`` (``()`` for a 2D image)."""
        if isinstance(index, int | np.integer):
            flat = int(index)
        else:
            flat = int(np.ravel_multi_index(tuple(index), self.stack_shape)) if index else 0
        rows = np.flatnonzero(self.geometry[:, 0] == flat)
        if rows.size == 0:
            raise InvalidInputError(f"plane {index} is not in the store (stack shape "
                                    f"{self.stack_shape}).")
        return self.read(int(rows[0]))


def _open_group(path: Path, mode: str) -> Any:
    """The zarr group at ``path`` if it is a napari-sam store, else None."""
    import zarr

    if not path.is_dir():
        return None
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception:  # not zarr, zarr v2, unreadable metadata
        return None
    if _ATTR not in group.attrs:
        return None
    return group


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class EmbedProgress:
    """One step of :func:`iter_embed`: ``done`` of ``total`` entries are in the store
    (those of earlier runs included) after entry ``entry`` (stack ``plane`` index,
    ``box`` ``(row0, col0, row1, col1)`` in the plane) was computed and written."""

    done: int
    total: int
    entry: int
    plane: tuple[int, ...]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class EmbedResult:
    """What :func:`iter_embed` did: ``status`` is ``"created"`` (a new store),
    ``"resumed"`` (some entries were there, the rest computed) or ``"up to date"``
    (nothing to do, nothing written); ``computed`` entries of ``total``."""

    path: Path
    status: str
    computed: int
    total: int


def iter_embed(
    predictor: Any,
    data: np.ndarray,
    path: str | os.PathLike,
    *,
    rgb: bool = False,
    contrast_limits: tuple[float, float] | None = None,
    model_name: str | None = None,
    tile_size: int | str | None = "auto",
    overlap: int | None = None,
    overwrite: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> Generator[EmbedProgress, None, EmbedResult]:
    """Embed every plane (and tile) of an image into the store at ``path``.

    A generator for workers (the widget's "precompute all planes" runs it in a
    thread): it yields an :class:`EmbedProgress` after each entry and returns an
    :class:`EmbedResult`; ``cancel`` is polled before each entry and raises
    :class:`~napari_sam.errors.CancelledError` (``close()`` also stops it between
    entries). Entries written before a stop are kept, and the next run resumes.

    Arguments:
      predictor: a :class:`~napari_sam.engine.predictor.Predictor` (its encoder and
        thread policy; its cache is neither read nor filled).
      data: ``(*stack, H, W)`` or, with ``rgb``, ``(*stack, H, W, C)`` image (numpy
        or any array-like read plane by plane: dask, zarr, a napari layer's data); each
        plane is normalised with :func:`~napari_sam.engine.image.to_rgb_uint8` and
        ``contrast_limits`` (None: each plane's own range; pass the stack's range,
        e.g. ``LoadedImage.contrast_limits()``, so that dim planes stay dim).
      path: the store (a folder, e.g. :func:`store_path_for` of the image file).
      model_name: the model's name for the signature (informative; default: the
        model's class name).
      tile_size, overlap: which planes are also embedded tile by tile (see
        :func:`resolve_tiling`).
      overwrite: replace an existing store (recompute everything) instead of resuming
        it or, when its signature differs, refusing.

    Raises:
      StoreMismatchError: ``path`` holds a store made for another model, image,
        normalisation or tiling (the message lists what differs), and not
        ``overwrite``.
      InvalidInputError: ``path`` exists and is not a napari-sam store (never
        replaced, not even with ``overwrite``), or bad arguments.
      CancelledError: ``cancel()`` returned True.
    """
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        data = np.asarray(data)
    _check_tiling(tile_size, overlap)
    n_axes = 3 if rgb else 2
    if len(data.shape) < n_axes or 0 in tuple(data.shape):
        raise InvalidInputError(
            f"image must be (*stack, H, W){' x C' if rgb else ''}, got shape "
            f"{tuple(data.shape)}."
        )
    if not rgb and len(data.shape) == 3 and data.shape[-1] in (3, 4):
        raise InvalidInputError(
            f"image of shape {tuple(data.shape)} looks like one RGB(A) image; pass rgb=True "
            "(a stack of planes 3 or 4 pixels wide cannot be segmented)."
        )
    stack_shape = tuple(int(n) for n in data.shape[: len(data.shape) - n_axes])
    plane_shape = (int(data.shape[len(stack_shape)]), int(data.shape[len(stack_shape) + 1]))
    model = predictor.model
    img_size = int(predictor.transform.target_length)
    signature = StoreSignature(
        model_name=str(model_name or type(model).__name__),
        weights=weights_hash(model),
        image=image_checksum(data),
        image_shape=tuple(int(n) for n in data.shape),
        normalisation={"contrast_limits": None if contrast_limits is None
                       else [float(contrast_limits[0]), float(contrast_limits[1])],
                       "rgb": bool(rgb)},
        tiling={"tile_size": tile_size if tile_size in (None, "auto") else int(tile_size),
                "overlap": None if overlap is None else int(overlap)},
    )
    path = Path(path)
    store, status = _open_for_writing(path, signature, overwrite)
    if store is None:
        geometry = plan_entries(stack_shape, plane_shape, img_size, tile_size, overlap,
                                predictor.transform)
        store = _create(path, signature, geometry)
    done = store.done()
    total = len(store)
    if done.all():
        return EmbedResult(path, "up to date", 0, total)
    group = store._group
    computed = 0
    n_done = int(done.sum())
    for flat in np.unique(store.geometry[~done, 0]):
        index = tuple(int(i) for i in np.unravel_index(int(flat), stack_shape)) \
            if stack_shape else ()
        rows = np.flatnonzero((store.geometry[:, 0] == flat) & ~done)
        plane_rgb = None
        for row in rows:
            if cancel is not None and cancel():
                raise CancelledError(
                    f"Embedding was cancelled after {n_done} of {total} entries; they are kept "
                    f"in {path}, and the next run computes the rest."
                )
            if plane_rgb is None:  # normalised once per plane, only when something is missing
                plane = np.asarray(data[index] if index else data)  # one plane read
                plane_rgb = to_rgb_uint8(plane, contrast_limits=contrast_limits)
            _, r0, c0, r1, c1, _h, _w = (int(v) for v in store.geometry[row])
            pixels = np.ascontiguousarray(plane_rgb[r0:r1, c0:c1])
            features = predictor.compute_embedding(pixels)
            _write_entry(group, int(row), total, features, image_key(pixels))
            del features  # one embedding alive at a time
            computed += 1
            n_done += 1
            yield EmbedProgress(n_done, total, int(row), index, (r0, c0, r1, c1))
    if status is None:
        status = "created"
    return EmbedResult(path, status, computed, total)


def iter_precompute(
    predictor: Any,
    data: Any,
    path: str | os.PathLike,
    **kwargs: Any,
) -> Generator[EmbedProgress, None, EmbedResult]:
    """The "precompute all planes" action, free of Qt: :func:`iter_embed` (same
    arguments, progress and ``cancel``), then ``predictor`` reads the finished store
    (:meth:`~napari_sam.engine.predictor.Predictor.use_store`), so every plane the
    user visits afterwards is embedded from disk.

    A widget runs it in a worker (napari's ``thread_worker`` consumes the generator:
    progress from the yielded steps, the result from the return value) and passes
    ``cancel`` (e.g. ``threading.Event.is_set``); pass the image layer's data,
    ``rgb`` and contrast limits, so the store holds exactly the pixels the widget
    embeds. A cancelled run keeps its finished planes, and the next run resumes.
    """
    result = yield from iter_embed(predictor, data, path, **kwargs)
    predictor.use_store(EmbeddingStore.open(path))
    return result


def embed_to_store(
    predictor: Any, data: np.ndarray, path: str | os.PathLike,
    progress: Callable[[EmbedProgress], Any] | None = None, **kwargs: Any,
) -> EmbedResult:
    """:func:`iter_embed` run to the end; ``progress(step)`` after each entry."""
    outcome: list[EmbedResult] = []

    def run() -> Generator[EmbedProgress, None, None]:
        outcome.append((yield from iter_embed(predictor, data, path, **kwargs)))

    for step in run():
        if progress is not None:
            progress(step)
    return outcome[0]


def _open_for_writing(
    path: Path, signature: StoreSignature, overwrite: bool
) -> tuple[EmbeddingStore | None, str | None]:
    """The existing store to resume (and ``"resumed"``), or ``(None, None)`` when a
    new one must be made (nothing there, or a store replaced with ``overwrite``)."""
    if not path.exists():
        return None, None
    if _open_group(path, "r") is None:
        raise InvalidInputError(
            f"{path} exists and is not a napari-sam embedding store, so it is never replaced "
            "(not even with --overwrite); choose another --out."
        )
    if overwrite:
        shutil.rmtree(path)
        return None, None
    try:
        store = EmbeddingStore.open(path, mode="r+")
        differences = store.signature.differences(signature)
    except (InvalidInputError, KeyError, ValueError, TypeError) as err:
        raise StoreMismatchError(
            f"{path} is an embedding store this napari-sam cannot reuse ({err}); pass "
            "--overwrite to recompute it."
        ) from err
    if differences:
        raise StoreMismatchError(
            f"{path} was made for something else: {'; '.join(differences)}. It is never "
            "reused for another model or image; pass --overwrite to replace it, or choose "
            "another --out."
        )
    return store, "resumed"


def _create(path: Path, signature: StoreSignature, geometry: np.ndarray) -> EmbeddingStore:
    """A new store with its signature and geometry; no entry is written yet."""
    import zarr

    # made in a hidden folder beside it and renamed into place: a store exists with its
    # signature and geometry, or not at all (an interrupted start leaves no half store)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        group.attrs[_ATTR] = {"version": FORMAT_VERSION, "signature": signature.to_json(),
                              "features_dtype": None}
        geo = group.create_array("geometry", shape=geometry.shape, chunks=geometry.shape,
                                 dtype="int64")
        geo[:] = geometry
        group.create_array("keys", shape=(len(geometry), _KEY_BYTES), chunks=(1, _KEY_BYTES),
                           dtype="uint8", fill_value=0, compressors=None)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddingStore.open(path, mode="r+")


def _write_entry(group: Any, row: int, total: int, features: Any, key: str) -> None:
    """Write entry ``row``'s features, then its key (which marks it complete)."""
    import torch

    feats = features.detach()
    if "features" not in group:  # made with the first entry: C, E and dtype known now
        _, c, eh, ew = feats.shape
        np_dtype = "float32" if feats.dtype in (torch.bfloat16, torch.float16) else \
            str(feats.dtype).removeprefix("torch.")
        group.create_array("features", shape=(total, c, eh, ew), chunks=(1, c, eh, ew),
                           dtype=np_dtype, fill_value=0)
        meta = dict(group.attrs[_ATTR])
        meta["features_dtype"] = str(feats.dtype).removeprefix("torch.")
        group.attrs[_ATTR] = meta
    array = group["features"]
    values = feats[0].float() if array.dtype == np.float32 else feats[0]
    array[row] = values.cpu().numpy()
    group["keys"][row] = np.frombuffer(bytes.fromhex(key), dtype=np.uint8)


def iter_planes(store: EmbeddingStore) -> Iterator[tuple[tuple[int, ...], EmbeddedImage]]:
    """``(stack index, whole-plane embedding)`` for every plane, one read at a time."""
    for flat in np.unique(store.geometry[:, 0]):
        index = tuple(int(i) for i in np.unravel_index(int(flat), store.stack_shape)) \
            if store.stack_shape else ()
        yield index, store.plane(int(flat))
