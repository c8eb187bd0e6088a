"""Instance segmentation datasets for training and evaluating SAM.

A dataset is a list of (image, instance-label image) pairs. Supported layouts
for a folder ``root`` (the first that matches is used):

1. ``root/images/<stem>.<ext>`` with ``root/labels/<stem>.<ext>`` (same stem;
   the extensions may differ). ``masks/`` is accepted instead of ``labels/``.
2. A flat folder with ``<stem>.<ext>`` next to ``<stem>_labels.<ext>``
   (also ``_label``, ``_masks`` or ``_mask``).

Images are read by :func:`napari_sam.engine.io.read_image` (any of
:data:`~napari_sam.engine.io.IMAGE_EXTENSIONS`: PNG, TIFF, JPEG, BMP), label
images by :func:`~napari_sam.engine.io.read_labels` (PNG or TIFF). An explicit list of
``(image_path, label_path)`` pairs works too. Images may be grayscale, RGB or
RGBA of any real dtype (normalised with
:func:`napari_sam.engine.image.to_rgb_uint8`, the function every inference
path uses); labels must be 2D integer images with 0 as background and one id
per object.

A :class:`Sample` is an image resized to the model's square input (longest
side to ``img_size`` like SAM, then zero padding at the bottom and right), or a
random crop of it at a random scale, with the label map resampled (nearest) to
the model input and to the mask decoder's low-resolution output.
Augmentation (:mod:`napari_sam.training.augment`, its preset's
:class:`~napari_sam.training.augment.AugmentConfig`) acts on that view: flips
and rotations, an optional zoom with the frame kept, then intensity.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from napari_sam.engine.io import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, read_image, read_labels
from napari_sam.errors import InvalidInputError
from napari_sam.models.sam import PIXEL_MEAN, PIXEL_STD

from .augment import (
    AugmentConfig,
    augment_geometry,
    augment_intensity,
    draw_zoom,
    nearest_indices,
    resize_pair,
    zoom_view,
)

__all__ = [
    "InstanceDataset",
    "Sample",
    "find_pairs",
    "load_ids",
    "split_ids",
]

LABEL_SUFFIXES = ("_labels", "_label", "_masks", "_mask")
LABEL_DIRS = ("labels", "masks")


def _image_hw(path: Path) -> tuple[int, int]:
    """Spatial shape (H, W) of an image file, read from its header only."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
        if len(shape) == 3 and len(axes) == 3 and "S" in axes:  # colour samples (read_image)
            return tuple(int(n) for a, n in zip(axes, shape, strict=True) if a != "S")
        if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4):
            raise InvalidInputError(
                f"{path} has shape {shape} (channels first); save it channels last (H, W, C)."
            )
        return int(shape[0]), int(shape[1])
    with Image.open(path) as im:
        w, h = im.size
    return int(h), int(w)


def _list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def _by_stem(paths: list[Path]) -> dict[str, Path]:
    return {p.stem: p for p in paths}


def find_pairs(root: str | Path) -> list[tuple[str, Path, Path]]:
    """Find ``(id, image_path, label_path)`` triples in ``root`` (layouts in the module doc).

    Raises:
      InvalidInputError: ``root`` is not a folder, holds no images, or some
        images have no label file (a few are listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"Dataset folder {str(root)!r} does not exist.")
    image_dir = root / "images"
    label_dir = next((root / d for d in LABEL_DIRS if (root / d).is_dir()), None)
    if image_dir.is_dir():
        images = _list_images(image_dir)
        labels = (_by_stem(_list_images(label_dir, LABEL_EXTENSIONS)) if label_dir is not None
                  else {})
        label_of = {p.stem: labels.get(p.stem) for p in images}
        where = f"{image_dir} (labels expected in {root / 'labels'} with the same name)"
    else:
        files = _list_images(root)
        label_stems = {p.stem for p in files if any(p.stem.endswith(s) for s in LABEL_SUFFIXES)}
        images = [p for p in files if p.stem not in label_stems]
        label_files = _by_stem(_list_images(root, LABEL_EXTENSIONS))
        label_of = {}
        for p in images:
            match = [label_files[p.stem + s] for s in LABEL_SUFFIXES if p.stem + s in label_files]
            label_of[p.stem] = match[0] if match else None
        where = f"{root} (labels expected as <name>_labels.png/.tif next to each image)"
    if not images:
        raise InvalidInputError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}. Use a folder with "
            "images/ and labels/ subfolders, or image files next to <name>_labels files."
        )
    missing = [p.name for p in images if label_of[p.stem] is None]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InvalidInputError(
            f"{len(missing)} of {len(images)} images in {where} have no label image: {shown}."
        )
    return [(p.stem, p, label_of[p.stem]) for p in images]


def split_ids(
    ids: Sequence[str], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: ``(train_ids, val_ids)``, both sorted.

    The split depends only on the sorted ids, ``val_fraction`` and ``seed``
    (not on the order of ``ids``). At least one id goes to each side when
    there are two or more ids and ``0 < val_fraction < 1``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    ordered = sorted(set(ids))
    n_val = int(round(len(ordered) * val_fraction))
    if val_fraction > 0 and len(ordered) >= 2:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val = sorted(ordered[i] for i in perm[:n_val])
    val_set = set(val)
    return [i for i in ordered if i not in val_set], val


@dataclasses.dataclass
class Sample:
    """One training/evaluation view of an image.

    Attributes:
      image: (3, S, S) float32, normalised with SAM's pixel mean/std, zero
        padded at the bottom/right (S = ``img_size``).
      labels: (S, S) int64 instance ids at model resolution (0 = background
        and padding).
      labels_low: (L, L) int64 instance ids at the mask decoder's output
        resolution (L = ``low_res_size``), nearest-sampled from ``labels``.
      input_size: (h, w) of the valid (unpadded) region in the model frame.
      image_id: the id of the source image.
    """

    image: torch.Tensor
    labels: torch.Tensor
    labels_low: torch.Tensor
    input_size: tuple[int, int]
    image_id: str


def _short(value: Any, limit: int = 60) -> str:
    """``value`` (or its repr) on one line, cut to ``limit`` characters for an error message."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _id_list(value: Any, what: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(i, (str, int)) and not isinstance(i, bool) for i in value
    ):
        raise InvalidInputError(
            f"{path}: {what} must be a list of image ids (strings or numbers), got "
            f"{_short(value, 40)}."
        )
    return [str(i) for i in value]


def load_ids(path: str | Path) -> tuple[list[str] | None, list[str]]:
    """Read an ids file: ``(train_ids or None, val_ids)``.

    Accepts a JSON list of validation ids, a JSON object with a ``"val"`` list
    (and optionally a ``"train"`` list), or a text file with one validation id
    a line. A file named ``.json``, or whose text starts with ``[`` or ``{``,
    must be valid JSON (it is never read as a text list).

    Raises:
      InvalidInputError: missing file, invalid JSON, or lists that are not
        lists of ids.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"ids file {str(path)!r} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{path}: cannot read the ids file ({err}).") from None
    looks_json = path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{")
    if not looks_json:
        return None, [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno} column {err.colno}); write a "
            'list of ids, {"val": [...], "train": [...]}, or a text file with one id a line.'
        ) from None
    if isinstance(data, list):
        return None, _id_list(data, "the list", path)
    if isinstance(data, dict) and "val" in data:
        # Descriptive keys ("dataset", "rule", "seed") are kept as documentation; an
        # unknown key holding a list is a misspelt split and must not be ignored.
        unknown = {key for key in set(data) - {"train", "val"} if isinstance(data[key], list)}
        if unknown:
            raise InvalidInputError(
                f"{path}: unknown list key(s) {', '.join(sorted(map(repr, unknown)))}; an ids "
                'object holds "val" and optionally "train" (other keys may only hold notes).'
            )
        train = data.get("train")
        return (None if train is None else _id_list(train, '"train"', path),
                _id_list(data["val"], '"val"', path))
    raise InvalidInputError(
        f"{path}: expected a list of ids or an object with a \"val\" list, got "
        f"{type(data).__name__}."
    )



class InstanceDataset:
    """Pairs of images and instance label images, sampled as model-sized views.

    Arguments:
      source: a dataset folder (layouts in the module doc) or a list of
        ``(image_path, label_path)`` pairs.
      img_size: side S of the model's square input.
      low_res_size: side L of the mask decoder's output (``4 *`` the image
        embedding size; ``S // 4`` for patch-16 ViTs).
      ids: keep only these image ids (file stems), in this order.
      augment: augmentation used by :meth:`sample` when ``augment=True``.
      pixel_mean, pixel_std: normalisation constants (SAM's by default).
      full_view_prob: in random samples, probability of taking the whole
        image (longest side resized to S, as at inference) instead of a
        random crop.
      scale_range: (min, max) zoom of random crops (model pixels per image
        pixel), sampled log-uniformly.
      min_area: instances smaller than this (model pixels) do not count when
        a random crop is checked for objects.
      cache: keep decoded images and labels in memory.

    Raises:
      InvalidInputError: no images, images without labels, image/label shape
        mismatch, non-integer labels, unknown ids, or only empty label images.
        Empty label images are skipped with a warning.
    """

    def __init__(
        self,
        source: str | Path | Sequence[tuple[str | Path, str | Path]],
        img_size: int = 1024,
        low_res_size: int | None = None,
        ids: Sequence[str] | None = None,
        augment: AugmentConfig | None = None,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        full_view_prob: float = 0.5,
        scale_range: tuple[float, float] = (0.5, 2.0),
        min_area: int = 4,
        cache: bool = False,
    ) -> None:
        if int(img_size) <= 0:
            raise InvalidInputError(f"img_size must be positive, got {img_size}.")
        self.img_size = int(img_size)
        self.low_res_size = int(low_res_size) if low_res_size else self.img_size // 4
        if not 0 < self.low_res_size <= self.img_size:
            raise InvalidInputError(f"low_res_size must be in 1..{img_size}, got {low_res_size}.")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise InvalidInputError(f"scale_range must be 0 < min <= max, got {scale_range}.")
        self.augment = augment if augment is not None else AugmentConfig()
        self.pixel_mean = np.asarray(pixel_mean, dtype=np.float32)
        self.pixel_std = np.asarray(pixel_std, dtype=np.float32)
        self.full_view_prob = float(full_view_prob)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.min_area = int(min_area)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

        if isinstance(source, (str, Path)):
            triples = find_pairs(source)
            self.root: Path | None = Path(source)
        else:
            triples = [(Path(i).stem, Path(i), Path(lab)) for i, lab in source]
            self.root = None
            if not triples:
                raise InvalidInputError("The list of (image, label) pairs is empty.")
            for _, img, lab in triples:
                for p in (img, lab):
                    if not p.is_file():
                        raise InvalidInputError(f"File {str(p)!r} does not exist.")
        if ids is not None:
            by_id = {t[0]: t for t in triples}
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
                raise InvalidInputError(f"{len(unknown)} ids are not in the dataset: {shown}.")
            triples = [by_id[i] for i in ids]
        self.ids: list[str] = []
        self.pairs: list[tuple[Path, Path]] = []
        self.n_instances: list[int] = []
        empty: list[str] = []
        for image_id, img, lab in triples:
            labels = self._read_labels(lab)
            hw = _image_hw(img)
            if hw != labels.shape:
                raise InvalidInputError(
                    f"Image {img.name} is {hw[0]}x{hw[1]} pixels but its label image "
                    f"{lab.name} is {labels.shape[0]}x{labels.shape[1]}; they must match."
                )
            n = len(np.unique(labels)) - int((labels == 0).any())
            if n == 0:
                empty.append(img.name)
                continue
            self.ids.append(image_id)
            self.pairs.append((img, lab))
            self.n_instances.append(n)
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            if not self.ids:
                raise InvalidInputError(
                    f"All {len(empty)} label images are empty (no objects): {shown}."
                )
            warnings.warn(
                f"Skipping {len(empty)} images with empty label images: {shown}", stacklevel=2
            )

    # ------------------------------------------------------------------ io
    @staticmethod
    def _read_labels(path: Path) -> np.ndarray:
        labels = read_labels(path)
        if labels.ndim == 3 and labels.shape[2] == 1:
            labels = labels[..., 0]
        if labels.ndim != 2:
            raise InvalidInputError(
                f"Label image {path.name} has shape {labels.shape}; expected a 2D image of "
                "instance ids."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise InvalidInputError(
                f"Label image {path.name} has dtype {labels.dtype}; instance labels must be "
                "integers (0 = background, one id per object). Convert a binary mask to "
                "instances first, e.g. with skimage.measure.label."
            )
        if labels.min() < 0:
            raise InvalidInputError(f"Label image {path.name} has negative ids.")
        return labels

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, img_size={self.img_size}, "
            f"low_res_size={self.low_res_size})"
        )

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` as ``(H, W, 3)`` uint8 RGB and its ``(H, W)`` int64 labels."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        from napari_sam.engine.image import to_rgb_uint8

        img_path, lab_path = self.pairs[index]
        raw = read_image(img_path).data
        image = to_rgb_uint8(raw)
        labels = self._read_labels(lab_path).astype(np.int64)
        if self._cache is not None:
            self._cache[index] = (image, labels)
        return image, labels

    # -------------------------------------------------------------- sampling
    def __getitem__(self, index: int) -> Sample:
        """The whole image ``index`` at model size, without augmentation."""
        return self.sample(index, rng=None, augment=False)

    def sample(
        self,
        index: int,
        rng: np.random.Generator | None = None,
        augment: bool = True,
        crop: bool | None = None,
    ) -> Sample:
        """A model-sized view of image ``index``.

        Arguments:
          rng: random source (``None``: the whole image, no augmentation).
          augment: apply :attr:`augment` (needs ``rng``).
          crop: ``True`` a random crop at a random scale, ``False`` the whole
            image, ``None`` choose at random with ``full_view_prob``.
        """
        image, labels = self.load(index)
        H, W = labels.shape
        S = self.img_size
        if rng is None:
            crop, augment = False, False
        elif crop is None:
            crop = bool(rng.random() >= self.full_view_prob)
        window = (0, 0, H, W)
        side = float(max(H, W))
        if crop:
            window, side = self._random_window(labels, rng)
        r0, c0, ch, cw = window
        image = image[r0 : r0 + ch, c0 : c0 + cw]
        labels = labels[r0 : r0 + ch, c0 : c0 + cw]
        if augment:
            image, labels = augment_geometry(image, labels, rng, self.augment)
            ch, cw = labels.shape
        scale = S / side
        h = min(S, max(1, int(ch * scale + 0.5)))
        w = min(S, max(1, int(cw * scale + 0.5)))
        zoom = draw_zoom(rng, self.augment) if augment else 1.0
        if zoom != 1.0:  # content zoomed, the (h, w) frame kept
            image, labels = zoom_view(image, labels, (h, w), zoom, rng)
        else:
            image, labels = resize_pair(image, labels, (h, w))
        pixels = image.astype(np.float32)
        if augment:
            pixels = augment_intensity(pixels, rng, self.augment, labels=labels)
        pixels = (pixels - self.pixel_mean) / self.pixel_std
        out = np.zeros((3, S, S), dtype=np.float32)
        out[:, :h, :w] = pixels.transpose(2, 0, 1)
        lab = np.zeros((S, S), dtype=np.int64)
        lab[:h, :w] = labels
        L = self.low_res_size
        low = lab[nearest_indices(L, S)][:, nearest_indices(L, S)]
        return Sample(
            image=torch.from_numpy(out),
            labels=torch.from_numpy(lab),
            labels_low=torch.from_numpy(np.ascontiguousarray(low)),
            input_size=(h, w),
            image_id=self.ids[index],
        )

    def _random_window(
        self, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[tuple[int, int, int, int], float]:
        """A random crop window ``(r0, c0, h, w)`` and its side in image pixels.

        The side is ``img_size / zoom`` with ``zoom`` log-uniform in
        :attr:`scale_range`; a few windows are tried to find one with an object.
        """
        H, W = labels.shape
        lo, hi = np.log(self.scale_range[0]), np.log(self.scale_range[1])
        best = None
        for _ in range(5):
            side = self.img_size / float(np.exp(rng.uniform(lo, hi)))
            ch, cw = min(H, max(1, int(round(side)))), min(W, max(1, int(round(side))))
            r0 = int(rng.integers(0, H - ch + 1))
            c0 = int(rng.integers(0, W - cw + 1))
            best = (r0, c0, ch, cw), side
            ids, counts = np.unique(labels[r0 : r0 + ch, c0 : c0 + cw], return_counts=True)
            zoom = self.img_size / side
            if np.any((ids > 0) & (counts * zoom * zoom >= self.min_area)):
                return best
        return (0, 0, H, W), float(max(H, W))
