"""Evaluate a SAM model on an instance-segmentation dataset.

:func:`evaluate` runs, per image, the interactive protocol of
:mod:`napari_sam.evaluation.interactive` (first click, correction clicks,
box) and optionally everything mode (:mod:`napari_sam.evaluation.everything`),
and returns a JSON-able dict::

    {
      "model": str, "data": str, "n_images": int, "n_objects": int,
      "settings": {...},                # with "mode" as asked ("auto", "amg", "ais")
                                        # and "tiling" ("auto", "off")
      "everything_mode": "ais" | "amg",  # the mode that ran (when everything ran)
      "interactive": {"point_miou": [after 1 click, after 2, ...],
                      "box_miou": float},            # means over all objects
      "everything": {"ap50": ..., "ap75": ..., "ap_dsb": ...,
                     "precision50": ..., "recall50": ..., "f1_50": ..., ...},
                                                     # means over images
      "per_image": [{"id": ..., "n_objects": ..., "point_miou": [...],
                     "box_miou": ..., "everything": {...}, "seconds": ...}, ...],
    }
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.errors import CancelledError, InvalidInputError

from .everything import evaluate_image_everything
from .interactive import evaluate_image_interactive
from .metrics import mean_metrics

__all__ = [
    "evaluate",
    "format_results",
    "write_results",
]


def _nanmean(x: np.ndarray, axis: int | None = None) -> Any:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.isnan(x).all():
        return float("nan") if axis is None else np.full(x.shape[1:], np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(x, axis=axis)


def _resolve_ids(ids: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """The image ids to evaluate (None: all); an ids file gives its validation ids."""
    if ids is None:
        return None
    if isinstance(ids, Sequence) and not isinstance(ids, str):
        resolved = [str(i) for i in ids]
        source = "ids"
    else:
        from napari_sam.training.datasets import load_ids

        resolved = load_ids(ids)[1]
        source = f"the ids file {ids}"
    if not resolved:
        raise InvalidInputError(
            f"{source} lists no (validation) ids; nothing to evaluate. List the image ids, or "
            "leave the ids out to evaluate every image."
        )
    return resolved


def evaluate(
    model: Any,
    root: str | os.PathLike,
    ids: Sequence[str] | str | os.PathLike | None = None,
    n_clicks: int = 3,
    everything: bool = True,
    max_images: int | None = None,
    progress: Callable[[int, int], Any] | None = None,
    box: bool = True,
    min_area: int = 10,
    everything_kwargs: dict[str, Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    device: str | None = None,
    mode: str = "auto",
    ais_kwargs: dict[str, Any] | None = None,
    tiling: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``model`` on the dataset in ``root`` (layouts: :mod:`napari_sam.training.datasets`).

    Arguments:
      model: a ``Sam`` module, a :class:`~napari_sam.engine.predictor.Predictor`,
        or a zoo name / checkpoint path for :func:`napari_sam.models.zoo.load_model`.
      ids: image ids to use, or an ids file (its validation ids; see
        :func:`napari_sam.training.datasets.load_ids`); all images when None.
      n_clicks: correction clicks after the first one.
      everything: also run everything mode (slow: a grid of prompts per image).
      max_images: evaluate at most this many images (the first ones).
      progress: called as ``progress(done, total)`` after each image.
      box: evaluate tight-box prompts.
      min_area: objects with fewer pixels are not prompted (interactive only;
        everything mode is scored against all objects).
      everything_kwargs: options of
        :class:`~napari_sam.engine.everything.AutomaticMaskGenerator` (mode amg).
      mode: automatic segmentation mode, ``"auto"`` (AIS where the model has an
        AIS head, else AMG), ``"amg"`` or ``"ais"``
        (:func:`~napari_sam.engine.ais.resolve_mode`).
      ais_kwargs: options of :class:`~napari_sam.engine.ais.InstanceSegmenter`
        (mode ais).
      tiling: interactive prompts on a large image: ``"auto"`` (as the widget: images
        longer than 2 x the model input are embedded in native-scale tiles,
        :mod:`napari_sam.engine.tiled`) or ``"off"`` (always the whole image at model
        scale). A :class:`~napari_sam.engine.predictor.Predictor` given as ``model``
        keeps its own ``tiling``.
      cancel: polled before each image; True raises CancelledError.
      device: torch device for a model given by name or path (None: the
        zoo's default).

    Returns:
      the results dict described in the module doc.

    Raises:
      InvalidInputError: no images to evaluate (an empty ids list,
        ``max_images`` < 1), negative ``n_clicks`` or ``min_area``, a bad ids
        file or dataset, a bad ``mode`` or mode ais on a model without a head.
    """
    import torch

    from napari_sam.engine.predictor import Predictor
    from napari_sam.engine.tiled import check_tiling_mode
    from napari_sam.training.datasets import InstanceDataset

    check_tiling_mode(tiling)

    for name, value, low in (("n_clicks", n_clicks, 0), ("min_area", min_area, 0),
                             ("max_images", 1 if max_images is None else max_images, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}.")
    ids = _resolve_ids(ids)
    model_name = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        from napari_sam.models.zoo import load_model

        model = load_model(str(model), device=device)
    if hasattr(model, "set_image"):
        predictor = model
    elif isinstance(model, torch.nn.Module):
        model.eval()
        predictor = Predictor(model, tiling=tiling)
    else:
        raise InvalidInputError(
            f"model must be a Sam module, a Predictor or a model name/path, got {type(model)}."
        )
    data = InstanceDataset(root, ids=ids)
    n = len(data) if max_images is None else min(len(data), int(max_images))
    if n == 0:
        raise InvalidInputError(f"{root}: no images to evaluate.")
    from napari_sam.engine.ais import make_segmenter, resolve_mode

    # a bad mode fails before any work
    resolved_mode = resolve_mode(predictor, mode) if everything else None
    generator = None
    if everything:
        generator = make_segmenter(predictor, resolved_mode, everything_kwargs, ais_kwargs)
    per_image: list[dict[str, Any]] = []
    point_all, box_all = [], []
    for i in range(n):
        if cancel is not None and cancel():
            raise CancelledError(f"Evaluation cancelled after {i} of {n} images.")
        tic = time.perf_counter()
        image, labels = data.load(i)
        res = evaluate_image_interactive(
            predictor, image, labels, n_clicks=n_clicks, box=box, min_area=min_area
        )
        point_all.append(res["point_iou"])
        box_all.append(res["box_iou"])
        entry: dict[str, Any] = {
            "id": data.ids[i],
            "n_objects": int(len(res["ids"])),
            "point_miou": [float(v) for v in _nanmean(res["point_iou"], 0)]
            if len(res["ids"])
            else [float("nan")] * (1 + n_clicks),
            "box_miou": float(_nanmean(res["box_iou"])) if box else None,
        }
        if generator is not None:
            entry["everything"] = evaluate_image_everything(generator, image, labels)
        entry["seconds"] = time.perf_counter() - tic
        per_image.append(entry)
        if progress is not None:
            progress(i + 1, n)
    points = np.concatenate(point_all) if point_all else np.zeros((0, 1 + n_clicks))
    boxes = np.concatenate(box_all) if box_all else np.zeros(0)
    results: dict[str, Any] = {
        "model": str(model_name),
        "data": str(root),
        "n_images": n,
        "n_objects": int(len(points)),
        "settings": {
            "n_clicks": n_clicks,
            "box": box,
            "min_area": min_area,
            "everything": everything,
            "everything_kwargs": everything_kwargs or {},
            "mode": mode,
            "ais_kwargs": ais_kwargs or {},
            "tiling": getattr(predictor, "tiling", tiling),
        },
        "interactive": {
            "point_miou": [float(v) for v in np.atleast_1d(_nanmean(points, 0))],
            "box_miou": float(_nanmean(boxes)) if box else None,
        },
    }
    if generator is not None:
        results["everything_mode"] = resolved_mode
        results["everything"] = mean_metrics([e["everything"] for e in per_image])
    results["per_image"] = per_image
    return results


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of the summary scores of :func:`evaluate`."""
    rows = [
        ("images", f"{results['n_images']}"),
        ("objects", f"{results['n_objects']}"),
    ]
    inter = results.get("interactive", {})
    for k, v in enumerate(inter.get("point_miou", [])):
        label = "1 point (best of 3)" if k == 0 else f"1 + {k} correction click{'s' * (k > 1)}"
        rows.append((f"mIoU {label}", f"{v:.4f}"))
    if inter.get("box_miou") is not None:
        rows.append(("mIoU box", f"{inter['box_miou']:.4f}"))
    ev = results.get("everything")
    if results.get("everything_mode"):
        rows.append(("everything mode", str(results["everything_mode"])))
    if ev:
        for key, name in (
            ("ap50", "everything AP@0.5 = TP/(TP+FP+FN)"),
            ("ap75", "everything AP@0.75"),
            ("ap_dsb", "everything AP@[0.5:0.95] (DSB)"),
            ("precision50", "everything precision@0.5"),
            ("recall50", "everything recall@0.5"),
            ("f1_50", "everything F1@0.5"),
        ):
            if key in ev:
                rows.append((name, f"{ev[key]:.4f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_results(results: dict[str, Any], path: str | os.PathLike, replace: bool = True) -> Path:
    """Write ``results`` as JSON (NaN becomes null), atomically.

    ``replace=False`` never replaces an existing file (FileExistsError).
    """
    from napari_sam._files import atomic_path

    path = Path(path)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    text = json.dumps(clean(results), indent=1)
    with atomic_path(path, replace=replace) as tmp:
        tmp.write_text(text)
    return path
