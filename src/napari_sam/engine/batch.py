"""Everything-mode over many files: inputs, outputs, resume, local or Dask runs.

One input file gives one output file (a label image, or a COCO JSON), plus an
optional overlay. The unit of work is one image (a stack counts as one image:
its planes are segmented one after the other by the same worker).

Resume: every output is written atomically (temporary file in the output
folder, then :func:`os.replace`), so an output either exists complete or not
at all. A rerun skips inputs whose outputs exist (unless ``overwrite``), which
makes an interrupted batch resumable by running the same command again.

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
from typing import Any

import numpy as np

from napari_sam.engine.io import (
    IMAGE_EXTENSIONS,
    LoadedImage,
    read_image,
    write_json,
    write_labels,
    write_overlay,
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
    "InputScan",
    "discover_inputs",
    "everything_labels",
    "get_generator",
    "get_model",
    "output_path",
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

_MODELS: dict[tuple[str | None, str | None], Any] = {}
#: at most this many generators are kept (least recently used dropped first): a
#: long-lived worker that sees many parameter sets must not grow without bound
GENERATOR_CACHE_SIZE = 8
_GENERATORS: dict[tuple, Any] = {}  # insertion order = use order (an LRU)
_MODELS_LOCK = threading.Lock()


def get_model(model_spec: str | None, device: str | None = None) -> Any:
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


def get_generator(
    model_spec: str | None, device: str | None, generator_kwargs: Mapping[str, Any]
) -> Any:
    """An ``AutomaticMaskGenerator`` for this process and thread (cached).

    Generators hold per-image state, so each thread gets its own; all share the
    process's model from :func:`get_model`. The cache keeps the
    :data:`GENERATOR_CACHE_SIZE` most recently used generators. Unless
    ``generator_kwargs`` say otherwise, the generators give cropped masks
    (``output_mode="cropped_mask"``): the batch only paints them.
    """
    from napari_sam.engine.everything import AutomaticMaskGenerator

    kwargs = {"output_mode": "cropped_mask", **dict(generator_kwargs)}
    key = (
        None if model_spec is None else str(model_spec),
        device,
        tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
        threading.get_ident(),
    )
    with _MODELS_LOCK:
        gen = _GENERATORS.pop(key, None)
        if gen is not None:
            _GENERATORS[key] = gen  # most recently used last
    if gen is None:
        gen = AutomaticMaskGenerator(get_model(model_spec, device), **kwargs)
        with _MODELS_LOCK:
            _GENERATORS[key] = gen
            while len(_GENERATORS) > GENERATOR_CACHE_SIZE:
                del _GENERATORS[next(iter(_GENERATORS))]
    return gen


def everything_labels(
    generator: Any,
    image: LoadedImage,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, list[tuple[tuple[int, ...], list[dict]]]]:
    """Run everything-mode on every plane of ``image``.

    Arguments:
      generator: an ``AutomaticMaskGenerator``.
      image: from :func:`~napari_sam.engine.io.read_image`.
      tile_size: tile planes larger than this (longest side) with
        ``generate_tiled``; None never tiles.
      tile_overlap: overlap of neighbouring tiles in pixels.
      cancel: polled between planes (and passed to the generator).

    Returns:
      ``(labels, records)``: ``labels`` is ``(*stack, H, W)`` uint32. Within a
      plane, masks are painted largest first (a small mask on a large one stays
      visible) and numbered in that order; ids continue from plane to plane, so
      a 2D object in slice 2 never shares an id with one in slice 1.
      ``records`` lists ``(plane_index, mask_records)`` per plane, in painting
      order, each record's ``"label"`` set to its id (0 if later masks cover it
      completely).
    """
    from napari_sam.engine.everything import records_to_labels

    h, w = image.plane_shape
    labels = np.zeros(image.stack_shape + (h, w), dtype=np.uint32)
    all_records: list[tuple[tuple[int, ...], list[dict]]] = []
    next_id = 0
    for index, plane in image.planes():
        if cancel is not None and cancel():
            raise CancelledError("Everything-mode was cancelled.")
        rgb = image.plane_rgb(plane)
        if tile_size is not None and max(h, w) > tile_size:
            from napari_sam.engine.tiles import generate_tiled

            records = generate_tiled(
                generator, rgb, tile_size=tile_size, overlap=tile_overlap, cancel=cancel
            )
        else:
            records = generator.generate(rgb, cancel=cancel, use_cache=False)
        records = sorted(records, key=lambda r: -int(r["area"]))  # stable: ties keep order
        plane_labels = np.asarray(records_to_labels(records, (h, w), order="input"),
                                  dtype=np.uint32)
        visible = set(np.unique(plane_labels).tolist())
        for k, rec in enumerate(records, start=1):
            rec["label"] = next_id + k if k in visible else 0
        if next_id:
            plane_labels[plane_labels > 0] += np.uint32(next_id)
        labels[index] = plane_labels
        all_records.append((index, records))
        next_id += len(records)
    return labels, all_records


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


def process_image(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    model_spec: str | None = None,
    generator_kwargs: Mapping[str, Any] | None = None,
    fmt: str = "tif",
    *,
    device: str | None = None,
    overlay: bool = False,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    torch_threads: int | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[str, str]:
    """Segment one input file and write its outputs (the task run by workers).

    Returns:
      ``("done", output_path)`` or ``("failed", message)`` for problems with
      this image (unreadable, wrong shape, unwritable output, ...).

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
    get_model(model_spec, device)  # model errors propagate on purpose
    try:
        image = read_image(input_path)
        if fmt == "png" and image.is_stack:
            raise InvalidInputError(
                f"{input_path.name} is a stack of shape {image.data.shape}; a PNG holds one 2D "
                "label image. Use --format tif for stacks."
            )
        generator = get_generator(model_spec, device, dict(generator_kwargs or {}))
        labels, records = everything_labels(generator, image, tile_size, tile_overlap, cancel)
        if overlay:
            rgb = np.empty(labels.shape + (3,), dtype=np.uint8)
            for index, plane in image.planes():
                rgb[index] = image.plane_rgb(plane)
            write_overlay(overlay_path(output, stack=image.is_stack), rgb, labels)
        # the main output last: its existence marks the input as finished
        if fmt == "coco":
            write_json(output, _coco_document(image, records))
        else:
            write_labels(output, labels)
    except (CancelledError, *_MODEL_ERRORS):
        raise
    except MemoryError:
        return "failed", f"{input_path}: out of memory (try --tile-size or a smaller model)"
    except (InvalidInputError, OSError) as err:
        return "failed", _message(input_path, err)
    except Exception as err:  # keep the batch going; say what broke
        return "failed", f"{input_path}: {type(err).__name__}: {err}"
    return "done", str(output)


def _message(path: Path, err: Exception) -> str:
    text = str(err)
    return text if str(path) in text or path.name in text else f"{path}: {text}"


# ---------------------------------------------------------------------- the batch


@dataclass
class BatchReport:
    """Outcome of :func:`run_batch`.

    Attributes:
      done: inputs segmented in this run.
      skipped: inputs whose outputs already existed.
      failed: ``(input, message)`` for inputs that could not be processed
        (including command-line arguments that named no file).
      ignored: ``(path, reason)`` for non-image files found in folders.
      outputs: input -> main output path, for every planned input.
    """

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    outputs: dict[Path, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failed

    def summary(self) -> str:
        """One line, e.g. ``"3 done, 1 skipped, 0 failed"``."""
        text = f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"
        if self.ignored:
            text += f" ({len(self.ignored)} non-image files ignored)"
        return text


def _finished(out: Path, overlay: bool) -> bool:
    """An input is finished when its main output (and overlay, if asked for) exist."""
    if not out.exists():
        return False
    return not overlay or overlay_path(out).exists() or overlay_path(out, stack=True).exists()


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
) -> BatchReport:
    """Run everything-mode on every input and write one output per input.

    Arguments:
      inputs: files, folders and glob patterns (see :func:`scan_inputs`).
      out_dir: folder for outputs (created); names from :func:`output_path`.
      model_spec: zoo name, checkpoint path, or None for the default model.
      generator_kwargs: ``AutomaticMaskGenerator`` keyword arguments.
      fmt: ``"tif"``, ``"png"`` (2D only) or ``"coco"``.
      overwrite: redo inputs whose outputs exist (default: skip them).
      scheduler: address of a Dask scheduler (``"tcp://host:port"``); None
        runs locally (see the module docstring).
      n_workers: local worker processes (ignored with ``scheduler``).
      progress: called as ``progress(n_finished, n_total, input, status)``
        after each input, status one of ``done``/``skipped``/``failed``.
      device: torch device for the model (None: the zoo's default).
      overlay: also write ``<stem>_overlay.png`` beside each output.
      tile_size, tile_overlap: tile planes larger than ``tile_size``.
      torch_threads: torch intra-op threads per worker process.
      out_file: exact output path for a single input (instead of
        ``out_dir``/name).
      cancel: polled between images; True stops the batch (finished outputs
        stay) and raises :class:`CancelledError`.

    Returns:
      A :class:`BatchReport`; ``report.failed`` lists per-image failures.

    Raises:
      ModelNotFoundError, CheckpointError, DownloadError: the model cannot be
        loaded (nothing is processed).
      InvalidInputError: bad arguments (format, worker count, ``out_file``
        with several inputs).
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
    spec = _resolve_model_spec(model_spec)
    kwargs = dict(generator_kwargs or {})

    report = BatchReport()
    scan = scan_inputs(inputs)
    report.ignored.extend(scan.ignored)
    report.failed.extend((Path(arg), msg) for arg, msg in scan.missing)
    if out_file is not None and len(scan.paths) != 1:
        raise InvalidInputError(
            f"An output file ({out_file}) takes exactly one input, got {len(scan.paths)}; "
            "pass an output folder instead."
        )

    # plan: input -> output; drop inputs that are outputs of this batch
    out_dir = Path(out_dir).expanduser().resolve()
    planned: dict[Path, Path] = {}
    for path in scan.paths:
        if out_file is not None:
            planned[path] = Path(out_file).expanduser().resolve()
        else:
            planned[path] = output_path(path, out_dir, fmt)
    output_set = set(planned.values())
    owner: dict[Path, Path] = {}
    todo: list[tuple[Path, Path]] = []
    n_total = len(planned) + len(report.failed)
    n_finished = len(report.failed)

    def note(path: Path, status: str) -> None:
        nonlocal n_finished
        n_finished += 1
        if progress is not None:
            progress(n_finished, n_total, path, status)

    for path, out in planned.items():
        if out == path:
            report.failed.append((path, f"{path}: the output would overwrite the input"))
            note(path, "failed")
            continue
        if path in output_set:
            report.ignored.append((path, "is an output of this batch"))
            n_total -= 1
            continue
        report.outputs[path] = out
        if out in owner:
            report.failed.append(
                (path, f"{path}: output {out.name} clashes with {owner[out].name}; rename one")
            )
            note(path, "failed")
            continue
        owner[out] = path
        if _finished(out, overlay) and not overwrite:
            report.skipped.append(path)
            note(path, "skipped")
        else:
            todo.append((path, out))

    if not todo:
        return report

    task_kwargs = dict(
        device=device,
        overlay=overlay,
        tile_size=None if tile_size is None else int(tile_size),
        tile_overlap=int(tile_overlap),
    )

    def record(path: Path, result: tuple[str, str]) -> None:
        status, message = result
        if status == "done":
            report.done.append(path)
        else:
            report.failed.append((path, message))
        note(path, status)

    if scheduler is None and (n_workers is None or int(n_workers) == 1):
        get_model(spec, device)  # model errors before any image
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
    record: Callable[[Path, tuple[str, str]], None],
    cancel: Callable[[], bool] | None,
) -> None:
    """Submit one task per image to a Dask cluster and collect statuses."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as err:
        raise InvalidInputError(
            "Running on several workers needs Dask: pip install 'napari-sam[distributed]'."
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
                    result = ("failed", f"{path}: {type(err).__name__}: {err}")
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
