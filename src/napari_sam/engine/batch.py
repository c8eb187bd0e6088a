"""Everything-mode over many files: inputs, outputs, resume, local or Dask runs.

One input file gives one output file (a label image, or a COCO JSON), plus an
optional overlay. The unit of work is one image (a stack counts as one image:
its planes are segmented one after the other by the same worker).

Resume: every output is written atomically (temporary file in the output
folder, then renamed), so an output either exists complete or not at all. A
rerun skips inputs whose outputs exist (unless ``overwrite``), which makes an
interrupted batch resumable by running the same command again.

Existing files: the output names are chosen here (``<stem>_labels.tif``,
``<stem>_overlay.png``, ...), so a file of that name may be the user's own
(the ground truth ``x_labels.tif`` beside ``x.png`` of a training folder).
Nothing is replaced without ``overwrite``, and a file that napari-sam did not
write (:func:`~napari_sam.engine.io.written_by_napari_sam`) is never
replaced, even with ``overwrite``: the input is skipped (or its overlay left
out) with a note. An input whose label image exists (written by napari-sam)
but whose overlay is missing gets the overlay drawn from the existing label
image, without running the model again. Files named like the outputs of
another input (``x_labels.tif``, ``x_overlay.png`` beside an input ``x.png``)
and outputs of this batch are not taken as inputs.

Where the work runs:

* **In process** (``scheduler=None``, ``n_workers`` None or 1, the default):
  the model is loaded once and images are processed one at a time. torch
  already spreads one image over all cores (intra-op threads), so running
  several images concurrently on one machine would only make them compete
  for the same cores and multiply the model's memory; this path also needs no
  Dask.
* **Local Dask cluster** (``n_workers > 1``): ``n_workers`` worker processes
  with one thread each; torch threads per worker default to
  ``cpu_count // n_workers``. Worth it on machines with many cores, where one
  image does not keep them all busy.
* **Existing Dask cluster** (``scheduler="tcp://host:port"``): one task per
  image is submitted to ``dask.distributed.Client(scheduler)``. Each worker
  process loads the model once (cached per process, keyed by model and
  device) and writes its results itself; tasks return a short status, never
  masks. Inputs, outputs and a model *file* must be on a file system that the
  workers see under the same absolute paths.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from napari_sam.engine.io import (
    IMAGE_EXTENSIONS,
    LoadedImage,
    read_image,
    read_labels,
    write_json,
    write_labels,
    write_overlay,
    written_by_napari_sam,
)
from napari_sam.errors import (
    CancelledError,
    CheckpointError,
    DownloadError,
    InvalidInputError,
    ModelNotFoundError,
)

__all__ = [
    "FORMATS",
    "BatchReport",
    "ImageResult",
    "InputScan",
    "discover_inputs",
    "everything_labels",
    "cached_generator",
    "cached_model",
    "clear_caches",
    "output_path",
    "overlay_from_output",
    "overlay_path",
    "process_image",
    "run_batch",
    "scan_inputs",
]

#: output formats: label TIFF, 16-bit label PNG, COCO JSON (RLE masks)
FORMATS = ("tif", "png", "coco")

#: errors that concern the model, not one image: they stop the whole batch
_MODEL_ERRORS = (ModelNotFoundError, CheckpointError, DownloadError)

ProgressCallback = Callable[[int, int, Path, str], None]
NoteCallback = Callable[[Path, str], None]

#: stem endings of the files written beside an input's outputs
_OUTPUT_TAILS = ("_labels", "_overlay")


# ---------------------------------------------------------------------- inputs / outputs


@dataclass
class InputScan:
    """What :func:`scan_inputs` found.

    Attributes:
      paths: image files to process, sorted and deduplicated (absolute).
      missing: ``(argument, message)`` for arguments that name no file
        (a missing path, a glob matching nothing, an empty folder).
      ignored: ``(path, reason)`` for files inside folders that are not
        images (by suffix) and were left out.
    """

    paths: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)


def _is_glob(text: str) -> bool:
    return glob.has_magic(text)


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def scan_inputs(inputs: Iterable[str | os.PathLike]) -> InputScan:
    """Expand files, folders and glob patterns into a sorted list of image files.

    * A file is taken as is (whatever its suffix: naming it is a request to
      read it, so a non-image fails later with a clear message).
    * A folder contributes its image files (non-recursive, by suffix, hidden
      files excluded); other files are listed in ``ignored``.
    * A pattern with ``*``, ``?`` or ``[...]`` is expanded (``**`` recurses);
      matching image files are taken, matching folders are expanded as above.
    """
    scan = InputScan()
    found: set[Path] = set()

    def add_folder(folder: Path, arg: str) -> None:
        n_before = len(found)
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or not child.is_file():
                continue
            if _is_image_name(child):
                found.add(child.resolve())
            else:
                scan.ignored.append((child, "not an image file (by suffix)"))
        if len(found) == n_before:
            scan.missing.append((arg, f"{arg}: folder holds no image files"))

    for item in inputs:
        arg = os.fspath(item)
        path = Path(arg).expanduser()
        if path.is_dir():
            add_folder(path, arg)
        elif path.is_file():
            found.add(path.resolve())
        elif _is_glob(arg):
            matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
            n_before = len(found)
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    add_folder(mp, m)
                elif mp.is_file() and _is_image_name(mp) and not mp.name.startswith("."):
                    found.add(mp.resolve())
                elif mp.is_file():
                    scan.ignored.append((mp, "not an image file (by suffix)"))
            if len(found) == n_before:
                scan.missing.append((arg, f"{arg}: no image files match this pattern"))
        else:
            scan.missing.append((arg, f"{arg}: no such file or folder"))
    scan.paths = sorted(found)
    return scan


def discover_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by ``inputs`` (files, folders, globs); sorted, deduplicated.

    See :func:`scan_inputs`, which also reports what was missing or ignored.
    """
    return scan_inputs(inputs).paths


def _check_format(fmt: str) -> str:
    fmt = str(fmt).lower()
    if fmt == "tiff":
        fmt = "tif"
    if fmt not in FORMATS:
        raise InvalidInputError(
            f"Unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}."
        )
    return fmt


def output_path(input: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "tif") -> Path:
    """Output file for ``input``: ``<out_dir>/<stem>_labels.tif|png`` or ``<stem>_coco.json``."""
    fmt = _check_format(fmt)
    stem = Path(input).stem
    name = f"{stem}_coco.json" if fmt == "coco" else f"{stem}_labels.{fmt}"
    return Path(out_dir) / name


def overlay_path(output: str | os.PathLike, stack: bool = False) -> Path:
    """Overlay beside an output: ``<stem>_overlay.png`` (``.tif`` for stacks).

    ``a_labels.tif`` and ``a_coco.json`` both give ``a_overlay.png``.
    """
    output = Path(output)
    stem = output.stem
    for tail in ("_labels", "_coco"):
        if stem.endswith(tail):
            stem = stem[: -len(tail)]
            break
    return output.with_name(f"{stem}_overlay.{'tif' if stack else 'png'}")


# ---------------------------------------------------------------------- per-image work
# Process-wide caches. A Dask worker runs many tasks in one process: each task asks
# cached_model / cached_generator, and only the first pays for loading the model. The
# models are kept until clear_caches() (there are few: one per (spec, device)); the
# generators, which hold per-image state and so are per thread, are an LRU of at most
# GENERATOR_CACHE_SIZE. A long-lived caller that is done with a model (a GUI, a notebook)
# frees them with clear_caches().

_MODELS: dict[tuple[str | None, str | None], Any] = {}
#: at most this many generators are kept (least recently used dropped first): a
#: long-lived worker that sees many parameter sets must not grow without bound
GENERATOR_CACHE_SIZE = 8
_GENERATORS: dict[tuple, Any] = {}  # insertion order = use order (an LRU)
_MODELS_LOCK = threading.Lock()


def cached_model(model_spec: str | None, device: str | None = None) -> Any:
    """Load a model once per process (cached by ``(model_spec, device)``).

    Dask workers call this from every task; only the first task in a worker
    process pays for loading.
    """
    key = (None if model_spec is None else str(model_spec), device)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            from napari_sam.models.zoo import load_model

            model = load_model(key[0], device=device)
            _MODELS[key] = model
    return model


def cached_generator(
    model_spec: str | None,
    device: str | None,
    generator_kwargs: Mapping[str, Any],
    mode: str = "amg",
    ais_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """The segmenter of ``mode`` for this process and thread (cached).

    Built by :func:`~napari_sam.engine.ais.make_segmenter`: an
    ``AutomaticMaskGenerator`` from ``generator_kwargs`` (mode ``"amg"``, the
    default, as before AIS; or ``"auto"`` on a model without an AIS head) or an
    :class:`~napari_sam.engine.ais.InstanceSegmenter` from ``ais_kwargs`` (mode
    ``"ais"``, or ``"auto"`` on a model with a head).

    Segmenters hold per-image state, so each thread gets its own; all share the
    process's model from :func:`cached_model`. The cache keeps the
    :data:`GENERATOR_CACHE_SIZE` most recently used ones. Unless the keywords
    say otherwise, they give cropped masks (``output_mode="cropped_mask"``):
    the batch only paints them.
    """
    from napari_sam.engine.ais import make_segmenter, resolve_mode

    model = cached_model(model_spec, device)
    mode = resolve_mode(model, mode)
    kwargs = {"output_mode": "cropped_mask",
              **dict(generator_kwargs if mode == "amg" else ais_kwargs or {})}
    key = (
        None if model_spec is None else str(model_spec),
        device,
        mode,
        tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
        threading.get_ident(),
    )
    with _MODELS_LOCK:
        gen = _GENERATORS.pop(key, None)
        if gen is not None:
            _GENERATORS[key] = gen  # most recently used last
    if gen is None:
        gen = make_segmenter(model, mode, amg_kwargs=kwargs, ais_kwargs=kwargs)
        with _MODELS_LOCK:
            _GENERATORS[key] = gen
            while len(_GENERATORS) > GENERATOR_CACHE_SIZE:
                del _GENERATORS[next(iter(_GENERATORS))]
    return gen


def clear_caches() -> None:
    """Drop every model and generator cached by :func:`cached_model` / :func:`cached_generator`."""
    with _MODELS_LOCK:
        _GENERATORS.clear()
        _MODELS.clear()


#: the names before issue 14 (they did not say "cached")
get_model = cached_model
get_generator = cached_generator


def everything_labels(
    generator: Any,
    image: LoadedImage,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    cancel: Callable[[], bool] | None = None,
    link_axis: int | None = None,
    link_iou: float = 0.3,
    min_planes: int = 1,
    use_cache: bool = False,
) -> tuple[np.ndarray, list[tuple[tuple[int, ...], list[dict]]]]:
    """Run everything-mode (AMG or AIS) on every plane of ``image``.

    Arguments:
      generator: an ``AutomaticMaskGenerator`` or an
        :class:`~napari_sam.engine.ais.InstanceSegmenter` (which tiles by its own
        ``tile_size`` / ``overlap``: the two arguments below are for AMG only).
      image: from :func:`~napari_sam.engine.io.read_image`.
      tile_size: tile planes larger than this (longest side) with
        ``generate_tiled``; None never tiles.
      tile_overlap: overlap of neighbouring tiles in pixels.
      cancel: polled between planes (and passed to the generator).
      link_axis: a stack axis (negative: from the last stack axis) along which
        the planes' objects are linked into 3D objects / tracks by overlap
        (:func:`~napari_sam.engine.stack.link_planes`, at IoU ``link_iou``);
        None (default), or an image without stack axes, labels planes apart.
      min_planes: with ``link_axis``, linked objects on fewer planes than this are
        dropped (pixels to 0, records removed); 1 (default) keeps all.
      use_cache: let the generator's predictor read (and fill) its embedding cache and
        its store (:meth:`~napari_sam.engine.predictor.Predictor.use_store`); off by
        default, so a batch does not fill the cache with images it sees once.

    Returns:
      ``(labels, records)``: ``labels`` is ``(*stack, H, W)`` uint32. Within a
      plane, masks are painted largest first (a small mask on a large one stays
      visible) and numbered in that order; ids are unique over the stack and
      consecutive from 1 in plane order (:mod:`napari_sam.engine.stack`); with
      ``link_axis``, an id is one linked object over its planes instead.
      ``records`` lists ``(plane_index, mask_records)`` per plane, in painting
      order, each record's ``"label"`` set to its id (0 if later masks cover it
      completely).
    """
    from napari_sam.engine.ais import InstanceSegmenter
    from napari_sam.engine.everything import records_to_labels
    from napari_sam.engine.stack import StackLabeller

    ais = isinstance(generator, InstanceSegmenter)
    h, w = image.plane_shape
    labels = np.zeros(image.stack_shape + (h, w), dtype=np.uint32)
    all_records: list[tuple[tuple[int, ...], list[dict]]] = []
    labeller = StackLabeller()  # the stack's id rule (napari_sam.engine.stack)
    for index, plane in image.planes():
        if cancel is not None and cancel():
            raise CancelledError("Everything-mode was cancelled.")
        rgb = image.plane_rgb(plane)
        if tile_size is not None and max(h, w) > tile_size and not ais:
            from napari_sam.engine.tiles import generate_tiled

            records = generate_tiled(
                generator, rgb, tile_size=tile_size, overlap=tile_overlap, cancel=cancel
            )
        else:
            records = generator.generate(rgb, cancel=cancel, use_cache=use_cache)
        records = sorted(records, key=lambda r: -int(r["area"]))  # stable: ties keep order
        plane_labels = np.asarray(records_to_labels(records, (h, w), order="input"),
                                  dtype=np.uint32)
        labels[index], new_ids = labeller.add(plane_labels)
        for k, rec in enumerate(records, start=1):
            rec["label"] = int(new_ids[k]) if k < len(new_ids) else 0
        all_records.append((index, records))
    if link_axis is not None and image.is_stack:
        from napari_sam.engine.stack import link_planes, linked_ids

        per_plane = labels
        labels = link_planes(per_plane, axis=link_axis, iou_threshold=link_iou,
                             min_planes=min_planes)
        for n, (index, records) in enumerate(all_records):
            new_of = linked_ids(per_plane[index], labels[index])
            # a record whose object was dropped as too short goes; one that later masks
            # cover completely (label 0 before linking) stays, as without linking
            kept = [rec for rec in records if not (rec["label"] and not new_of[rec["label"]])]
            for rec in kept:
                rec["label"] = new_of.get(rec["label"], 0)
            all_records[n] = (index, kept)
    return labels, all_records


def _use_store_beside(generator: Any, input_path: Path) -> str | None:
    """Let ``generator``'s predictor read the embedding store beside ``input_path``
    (``napari-sam embed``'s ``IMAGE.sam.zarr``); the note for the user, or None when
    there is no store there (see :func:`~napari_sam.engine.store.use_store_beside`)."""
    from napari_sam.engine.store import use_store_beside

    predictor = getattr(generator, "predictor", None)
    return None if predictor is None else use_store_beside(predictor, input_path)


def _coco_document(image: LoadedImage, records: list[tuple[tuple[int, ...], list[dict]]]) -> dict:
    """COCO-style JSON for one input (one COCO image per plane, uncompressed RLE masks)."""
    from napari_sam.engine.masks import coco_annotations

    h, w = image.plane_shape
    images, annotations = [], []
    for image_id, (index, recs) in enumerate(records, start=1):
        entry: dict[str, Any] = {
            "id": image_id, "file_name": image.path.name, "height": h, "width": w
        }
        if index:
            entry["plane"] = [int(i) for i in index]
        images.append(entry)
        anns = coco_annotations(
            recs, image_id=image_id, image_shape=(h, w), start_id=len(annotations) + 1
        )
        for ann, rec in zip(anns, recs, strict=True):
            for key in ("predicted_iou", "stability_score", "point_coords", "crop_box", "label"):
                if key in rec:
                    ann[key] = _jsonable(rec[key])
        annotations.extend(anns)
    return {
        "info": {"description": "napari-sam everything-mode", "source": image.path.name},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class ImageResult(NamedTuple):
    """What one input's task reports back (small: it travels from Dask workers).

    Attributes:
      status: ``"done"``, ``"overlay"`` (overlay drawn from an existing
        output), ``"skipped"`` or ``"failed"``.
      message: the main output path (done, overlay), or why it failed.
      notes: one-line remarks for the user (how a file was read, a file that
        was not replaced, ...).
    """

    status: str
    message: str
    notes: tuple[str, ...] = ()


def _overlay_target(
    output: Path, stack: bool, overwrite: bool, input_path: Path
) -> tuple[Path | None, str | None]:
    """Where to write the overlay, or ``(None, note)`` if an existing file must be kept."""
    target = overlay_path(output, stack=stack)
    if not target.exists():
        return target, None
    ours = written_by_napari_sam(target)
    if overwrite and ours:
        return target, None
    why = ("pass --overwrite to replace it" if ours
           else "it was not written by napari-sam, so it is never replaced")
    return None, (f"{target} exists and was kept; no overlay for {input_path.name} ({why}).")


def _rgb_planes(image: LoadedImage) -> np.ndarray:
    """``(*stack, H, W, 3)`` uint8 of every plane (for overlays)."""
    rgb = np.empty(image.stack_shape + image.plane_shape + (3,), dtype=np.uint8)
    for index, plane in image.planes():
        rgb[index] = image.plane_rgb(plane)
    return rgb


def process_image(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    model_spec: str | None = None,
    generator_kwargs: Mapping[str, Any] | None = None,
    fmt: str = "tif",
    *,
    device: str | None = None,
    overlay: bool = False,
    overwrite: bool = False,
    channels_as_planes: bool = False,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    torch_threads: int | None = None,
    cancel: Callable[[], bool] | None = None,
    mode: str = "auto",
    ais_kwargs: Mapping[str, Any] | None = None,
    link_axis: int | None = None,
    link_iou: float = 0.3,
    min_planes: int = 1,
) -> ImageResult:
    """Segment one input file and write its outputs (the task run by workers).

    The main output is written first (its existence marks the input as
    finished), then the overlay. Without ``overwrite`` an existing file is
    never replaced (the write fails instead, also against a concurrent
    writer); an existing overlay is kept with a note unless ``overwrite`` is
    set and napari-sam wrote it. ``mode``, ``generator_kwargs`` and
    ``ais_kwargs`` choose the segmenter (:func:`cached_generator`);
    ``tile_size`` / ``tile_overlap`` tile AMG only (AIS tiles by ``ais_kwargs``);
    ``link_axis`` / ``link_iou`` / ``min_planes`` link a stack's planes
    (:func:`everything_labels`).

    Returns:
      ``ImageResult("done", output_path, notes)`` or
      ``ImageResult("failed", message, notes)`` for problems with this image
      (unreadable, wrong shape, unwritable output, ...).

    Raises:
      ModelNotFoundError, CheckpointError, DownloadError: the model cannot be
        loaded; this concerns every image, so the batch stops.
      CancelledError: ``cancel()`` returned True.
    """
    if torch_threads:
        import torch

        if torch.get_num_threads() != int(torch_threads):
            torch.set_num_threads(int(torch_threads))
    input_path, output = Path(input_path), Path(output)
    fmt = _check_format(fmt)
    model = cached_model(model_spec, device)  # model errors propagate on purpose
    from napari_sam.engine.ais import resolve_mode

    mode = resolve_mode(model, mode)  # a head-less model asked for AIS concerns every image
    notes: list[str] = []
    try:
        image = read_image(input_path, channels_as_planes=channels_as_planes)
        if image.notice:
            notes.append(image.notice)
        if fmt == "png" and image.is_stack:
            raise InvalidInputError(
                f"{input_path.name} is a stack of shape {image.data.shape}; a PNG holds one 2D "
                "label image. Use --format tif for stacks."
            )
        overlay_file = None
        if overlay:
            overlay_file, note = _overlay_target(output, image.is_stack, overwrite, input_path)
            if note:
                notes.append(note)
        if mode == "amg":
            generator = cached_generator(model_spec, device, dict(generator_kwargs or {}))
        else:
            generator = cached_generator(model_spec, device, {}, "ais", ais_kwargs)
        store_note = _use_store_beside(generator, input_path)
        if store_note:
            notes.append(store_note)
        try:
            labels, records = everything_labels(
                generator, image, tile_size, tile_overlap, cancel, link_axis=link_axis,
                link_iou=link_iou, min_planes=min_planes, use_cache=store_note is not None
                and store_note.startswith("reading"))
        finally:
            if store_note is not None:
                generator.predictor.use_store(None)  # the generator is shared by other images
        # the main output first: its existence marks the input as finished, and a rerun
        # with --overlay draws a missing overlay from it
        if fmt == "coco":
            write_json(output, _coco_document(image, records), replace=overwrite)
        else:
            write_labels(output, labels, replace=overwrite)
        if overlay_file is not None:
            write_overlay(overlay_file, _rgb_planes(image), labels, replace=overwrite)
    except (CancelledError, *_MODEL_ERRORS):
        raise
    except MemoryError:
        return ImageResult(
            "failed", f"{input_path}: out of memory (try --tile-size or a smaller model)",
            tuple(notes))
    except (InvalidInputError, OSError) as err:
        return ImageResult("failed", _message(input_path, err), tuple(notes))
    except Exception as err:  # keep the batch going; say what broke
        return ImageResult("failed", f"{input_path}: {type(err).__name__}: {err}", tuple(notes))
    return ImageResult("done", str(output), tuple(notes))


def _labels_from_output(output: Path, image: LoadedImage) -> np.ndarray:
    """The ``(*stack, H, W)`` label image stored in an existing output (labels or COCO)."""
    shape = image.stack_shape + image.plane_shape
    if output.suffix.lower() != ".json":
        labels = np.asarray(read_labels(output))
    else:
        import json

        from napari_sam.engine.masks import rle_to_mask

        doc = json.loads(output.read_text(encoding="utf-8"))
        labels = np.zeros(shape, dtype=np.uint32)
        planes = {int(entry["id"]): tuple(entry.get("plane", ())) for entry in doc["images"]}
        for ann in doc["annotations"]:  # in painting order
            mask = rle_to_mask(ann["segmentation"])
            if mask.shape != image.plane_shape:
                raise InvalidInputError(
                    f"{output} holds masks of shape {mask.shape} but {image.path.name} is "
                    f"{image.plane_shape}; pass --overwrite to segment it again."
                )
            labels[planes[int(ann["image_id"])]][mask] = int(ann.get("label", ann["id"]))
    if labels.shape != shape:
        raise InvalidInputError(
            f"{output} holds labels of shape {labels.shape} but {image.path.name} is "
            f"{shape}; pass --overwrite to segment it again."
        )
    return labels


def overlay_from_output(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    channels_as_planes: bool = False,
) -> ImageResult:
    """Draw the missing overlay of an input from its existing main output.

    Used when a batch is rerun with ``overlay=True`` over outputs written
    without overlays: the labels are read back instead of segmenting again.
    Never replaces a file.

    Returns:
      ``ImageResult("overlay", output, notes)`` or ``ImageResult("failed", message)``.
    """
    input_path, output = Path(input_path), Path(output)
    notes: list[str] = []
    try:
        image = read_image(input_path, channels_as_planes=channels_as_planes)
        if image.notice:
            notes.append(image.notice)
        labels = _labels_from_output(output, image)
        target, note = _overlay_target(output, image.is_stack, False, input_path)
        if target is None:
            return ImageResult("skipped", str(output), (*notes, note or ""))
        write_overlay(target, _rgb_planes(image), labels, replace=False)
    except (InvalidInputError, OSError) as err:
        return ImageResult("failed", _message(input_path, err), tuple(notes))
    except Exception as err:  # a damaged output file: say what broke, go on
        return ImageResult(
            "failed", f"{input_path}: cannot draw the overlay from {output.name} "
            f"({type(err).__name__}: {err}); pass --overwrite to segment it again", tuple(notes))
    notes.append(f"{input_path.name}: overlay {target.name} drawn from the existing "
                 f"{output.name} (not segmented again).")
    return ImageResult("overlay", str(output), tuple(notes))


def _message(path: Path, err: Exception) -> str:
    text = str(err)
    return text if str(path) in text or path.name in text else f"{path}: {text}"


# ---------------------------------------------------------------------- the batch


@dataclass
class BatchReport:
    """Outcome of :func:`run_batch`.

    Attributes:
      done: inputs segmented in this run.
      skipped: inputs not segmented because their outputs already existed
        (including those whose missing overlay was drawn from the existing
        output, also listed in ``overlays``).
      failed: ``(input, message)`` for inputs that could not be processed
        (including command-line arguments that named no file).
      ignored: ``(path, reason)`` for non-image files found in folders.
      not_inputs: ``(path, reason)`` for image files taken for outputs (of
        this batch, or named like the outputs of another input) and not
        segmented.
      overlays: inputs whose overlay was drawn from an existing output.
      notes: ``(input, text)`` one-line remarks (a file read as RGB, an
        existing file kept, ...).
      outputs: input -> main output path, for every planned input.
    """

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    not_inputs: list[tuple[Path, str]] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)
    outputs: dict[Path, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failed

    def summary(self) -> str:
        """One line, e.g. ``"3 done, 1 skipped, 0 failed"`` (plus what was left out)."""
        text = f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"
        extra = []
        if self.overlays:
            extra.append(f"{_count(len(self.overlays), 'overlay')} drawn from existing outputs")
        if self.ignored:
            extra.append(f"{_count(len(self.ignored), 'non-image file')} ignored")
        if self.not_inputs:
            extra.append(f"{_count(len(self.not_inputs), 'output')} not taken as input"
                         f"{'s' if len(self.not_inputs) > 1 else ''}")
        return text + (f" ({'; '.join(extra)})" if extra else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _overlay_exists(out: Path) -> bool:
    return overlay_path(out).exists() or overlay_path(out, stack=True).exists()


def _derived_from(path: Path, stems: set[tuple[Path, str]]) -> str | None:
    """The stem of the input ``path`` is named after (``x`` for ``x_labels.tif``), or None."""
    for tail in _OUTPUT_TAILS:
        if path.stem.endswith(tail) and len(path.stem) > len(tail):
            owner = path.stem[: -len(tail)]
            if (path.parent, owner) in stems:
                return owner
    return None


def _resolve_model_spec(model_spec: str | os.PathLike | None) -> str | None:
    """Make a local model file absolute so remote workers find the same path."""
    if model_spec is None:
        return None
    spec = os.fspath(model_spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path.resolve())
    return spec


def _check_model_name(model_spec: str | None) -> None:
    """Fail early (on the client) for a name that is neither in the zoo nor a file."""
    if model_spec is None or model_spec == "default":
        return
    path = Path(model_spec)
    looks_like_path = path.suffix != "" or os.sep in model_spec or "/" in model_spec
    if looks_like_path:
        return  # may exist on the workers only; they will say if it does not
    from napari_sam.models.zoo import list_models

    names = list_models()
    if model_spec not in names:
        raise ModelNotFoundError(
            f"Unknown model {model_spec!r}; valid names: {', '.join(names)} "
            "(or a path to a .safetensors/.pth checkpoint)."
        )


def run_batch(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    model_spec: str | os.PathLike | None = None,
    generator_kwargs: Mapping[str, Any] | None = None,
    fmt: str = "tif",
    overwrite: bool = False,
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    device: str | None = None,
    overlay: bool = False,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    torch_threads: int | None = None,
    out_file: str | os.PathLike | None = None,
    cancel: Callable[[], bool] | None = None,
    channels_as_planes: bool = False,
    notify: NoteCallback | None = None,
    mode: str = "auto",
    ais_kwargs: Mapping[str, Any] | None = None,
    link_axis: int | None = None,
    link_iou: float = 0.3,
    min_planes: int = 1,
) -> BatchReport:
    """Run everything-mode on every input and write one output per input.

    Arguments:
      inputs: files, folders and glob patterns (see :func:`scan_inputs`).
      out_dir: folder for outputs (created); names from :func:`output_path`.
      model_spec: zoo name, checkpoint path, or None for the default model.
      generator_kwargs: ``AutomaticMaskGenerator`` keyword arguments.
      fmt: ``"tif"``, ``"png"`` (2D only) or ``"coco"``.
      overwrite: redo inputs whose outputs exist, replacing outputs that
        napari-sam wrote (default: skip them). Files it did not write are
        never replaced (see the module docstring).
      scheduler: address of a Dask scheduler (``"tcp://host:port"``); None
        runs locally (see the module docstring).
      n_workers: local worker processes (ignored with ``scheduler``).
      progress: called as ``progress(n_finished, n_total, input, status)``
        after each input, status one of ``done``/``overlay``/``skipped``/
        ``failed``. ``n_total`` is fixed before the first call.
      device: torch device for the model (None: the zoo's default).
      overlay: also write ``<stem>_overlay.png`` beside each output.
      tile_size, tile_overlap: tile planes larger than ``tile_size``.
      torch_threads: torch intra-op threads per worker process.
      out_file: exact output path for a single input (instead of
        ``out_dir``/name). Named by the caller, so ``overwrite`` replaces
        it whoever wrote it.
      cancel: polled between images; True stops the batch (finished outputs
        stay) and raises :class:`CancelledError`.
      channels_as_planes: read colour samples as stack planes (see
        :func:`~napari_sam.engine.io.read_image`).
      notify: called as ``notify(input, text)`` for every note, as it comes
        (notes are also collected in ``report.notes``).
      mode: ``"auto"`` (AIS where the model has an AIS head, else AMG),
        ``"amg"`` or ``"ais"`` (:func:`~napari_sam.engine.ais.resolve_mode`).
      ais_kwargs: :class:`~napari_sam.engine.ais.InstanceSegmenter` keywords
        (AIS settings, ``tile_size``, ``overlap``), used in mode ais; AIS
        ignores ``generator_kwargs`` / ``tile_size`` / ``tile_overlap``.
      link_axis, link_iou: link the objects of a stack's planes along this stack
        axis into 3D objects / tracks (:func:`everything_labels`); None labels
        each plane apart; 2D images are not affected.
      min_planes: with ``link_axis``, drop linked objects on fewer planes than
        this (:func:`~napari_sam.engine.stack.drop_short_objects`; 1 keeps all).

    Returns:
      A :class:`BatchReport`; ``report.failed`` lists per-image failures.

    Raises:
      ModelNotFoundError, CheckpointError, DownloadError: the model cannot be
        loaded (nothing is processed).
      InvalidInputError: bad arguments (format, worker count, ``out_file``
        with several inputs, ``mode``; mode ais on a model without a head
        when it runs in this process).
      CancelledError: cancelled through ``cancel``.
    """
    fmt = _check_format(fmt)
    if n_workers is not None and int(n_workers) < 1:
        raise InvalidInputError(f"n_workers must be at least 1, got {n_workers}.")
    if tile_size is not None and int(tile_size) < 16:
        raise InvalidInputError(f"tile_size must be at least 16 pixels, got {tile_size}.")
    if tile_size is not None and not 0 <= int(tile_overlap) < int(tile_size):
        raise InvalidInputError(
            f"tile_overlap must be in [0, tile_size), got {tile_overlap} for tile_size {tile_size}."
        )
    from napari_sam.engine.ais import MODES

    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    from napari_sam.engine.stack import check_link_iou, check_min_planes

    if link_axis is not None:
        check_link_iou(link_iou)  # before any image
    min_planes = check_min_planes(min_planes)
    spec = _resolve_model_spec(model_spec)
    kwargs = dict(generator_kwargs or {})

    report = BatchReport()
    scan = scan_inputs(inputs)
    report.ignored.extend(scan.ignored)
    if out_file is not None and len(scan.paths) != 1:
        raise InvalidInputError(
            f"An output file ({out_file}) takes exactly one input, got {len(scan.paths)}; "
            "pass an output folder instead."
        )

    def add_note(path: Path, text: str) -> None:
        report.notes.append((path, text))
        if notify is not None:
            notify(path, text)

    # plan: input -> output. Files named like another input's outputs, and outputs of
    # this batch, are not inputs.
    out_dir = Path(out_dir).expanduser().resolve()
    stems = {(p.parent, p.stem) for p in scan.paths}
    planned: dict[Path, Path] = {}
    for path in scan.paths:
        owner_stem = _derived_from(path, stems)
        if owner_stem is not None:
            report.not_inputs.append(
                (path, f"named like an output of {owner_stem} (segment it in a run of its own "
                       "to treat it as an image)"))
        elif out_file is not None:
            planned[path] = Path(out_file).expanduser().resolve()
        else:
            planned[path] = output_path(path, out_dir, fmt)
    output_set = set(planned.values())
    if overlay:
        output_set |= {overlay_path(o, stack=s) for o in planned.values() for s in (False, True)}
    events: list[tuple[Path, str]] = [(Path(arg), "failed") for arg, _ in scan.missing]
    report.failed.extend((Path(arg), msg) for arg, msg in scan.missing)
    owner: dict[Path, Path] = {}
    todo: list[tuple[Path, Path]] = []
    overlay_todo: list[tuple[Path, Path]] = []
    for path, out in planned.items():
        if out == path or (overlay and path in (overlay_path(out), overlay_path(out, True))):
            what = "output" if out == path else "overlay"
            report.failed.append((path, f"{path}: the {what} would overwrite the input"))
            events.append((path, "failed"))
            continue
        if path in output_set:
            report.not_inputs.append((path, "is an output of this batch"))
            continue
        report.outputs[path] = out
        if out in owner:
            report.failed.append(
                (path, f"{path}: output {out.name} clashes with {owner[out].name}; rename one")
            )
            events.append((path, "failed"))
            continue
        owner[out] = path
        if not out.exists():
            todo.append((path, out))
            continue
        tagged = written_by_napari_sam(out)
        replaceable = tagged or out_file is not None  # a file the user named may be replaced
        if overwrite and replaceable:
            todo.append((path, out))
            continue
        if not replaceable:
            why = ("it is never replaced, even with --overwrite" if overwrite
                   else "choose another --out folder")
            add_note(path, f"{out} exists and was not written by napari-sam: kept, "
                           f"{path.name} not segmented ({why}).")
        elif overlay and not _overlay_exists(out):
            if tagged:
                overlay_todo.append((path, out))
                continue
            add_note(path, f"{out} exists but was not written by napari-sam: no overlay drawn "
                           "from it (pass --overwrite to segment the input again).")
        report.skipped.append(path)
        events.append((path, "skipped"))

    n_total = len(events) + len(overlay_todo) + len(todo)
    n_finished = 0

    def note(path: Path, status: str) -> None:
        nonlocal n_finished
        n_finished += 1
        if progress is not None:
            progress(n_finished, n_total, path, status)

    for path, status in events:
        note(path, status)

    def record(path: Path, result: tuple) -> None:
        result = ImageResult(*result)
        for text in result.notes:
            if text:
                add_note(path, text)
        if result.status == "done":
            report.done.append(path)
        elif result.status == "overlay":
            report.skipped.append(path)
            report.overlays.append(path)
        elif result.status == "skipped":
            report.skipped.append(path)
        else:
            report.failed.append((path, result.message))
        note(path, result.status)

    for path, out in overlay_todo:  # cheap, no model: always here
        if cancel is not None and cancel():
            raise CancelledError("The batch was cancelled; finished outputs are kept.")
        record(path, overlay_from_output(path, out, channels_as_planes=channels_as_planes))

    if not todo:
        return report

    task_kwargs = dict(
        device=device,
        overlay=overlay,
        overwrite=overwrite,
        channels_as_planes=channels_as_planes,
        tile_size=None if tile_size is None else int(tile_size),
        tile_overlap=int(tile_overlap),
        mode=mode,
        ais_kwargs=dict(ais_kwargs or {}),
        link_axis=link_axis,
        link_iou=float(link_iou),
        min_planes=min_planes,
    )

    if scheduler is None and (n_workers is None or int(n_workers) == 1):
        from napari_sam.engine.ais import resolve_mode

        resolve_mode(cached_model(spec, device), mode)  # model errors before any image
        if torch_threads:
            task_kwargs["torch_threads"] = int(torch_threads)
        for path, out in todo:
            if cancel is not None and cancel():
                raise CancelledError("The batch was cancelled; finished outputs are kept.")
            record(path, process_image(path, out, spec, kwargs, fmt, cancel=cancel, **task_kwargs))
        return report

    _check_model_name(spec)
    _run_dask(todo, spec, kwargs, fmt, task_kwargs, scheduler, n_workers, torch_threads,
              record, cancel)
    return report


def _run_dask(
    todo: list[tuple[Path, Path]],
    spec: str | None,
    kwargs: dict[str, Any],
    fmt: str,
    task_kwargs: dict[str, Any],
    scheduler: str | None,
    n_workers: int | None,
    torch_threads: int | None,
    record: Callable[[Path, tuple], None],
    cancel: Callable[[], bool] | None,
) -> None:
    """Submit one task per image to a Dask cluster and collect statuses."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as err:
        raise InvalidInputError(
            "Running on several workers needs Dask: pip install 'napari-sam-kit[distributed]'."
        ) from err

    cluster = None
    if scheduler is None:
        n = int(n_workers or 1)
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        if not torch_threads:
            torch_threads = max(1, (os.cpu_count() or 1) // n)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise InvalidInputError(
                f"Cannot connect to the Dask scheduler at {scheduler} ({err}); start one with "
                "'dask scheduler' and check the address."
            ) from err
    if torch_threads:
        task_kwargs = {**task_kwargs, "torch_threads": int(torch_threads)}
    try:
        futures = {}
        for path, out in todo:
            fut = client.submit(
                process_image, str(path), str(out), spec, kwargs, fmt, pure=False, **task_kwargs
            )
            futures[fut] = path
        try:
            for fut in as_completed(list(futures)):
                path = futures[fut]
                try:
                    result = fut.result()
                except _MODEL_ERRORS:
                    raise
                except Exception as err:  # a worker died or the task could not run
                    result = ImageResult("failed", f"{path}: {type(err).__name__}: {err}")
                record(path, result)
                if cancel is not None and cancel():
                    raise CancelledError("The batch was cancelled; finished outputs are kept.")
        except BaseException:
            client.cancel(list(futures))
            raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
