"""Reading images and writing label images, overlays and JSON, atomically.

Used by the command line and the batch runner; the napari widgets read through
napari instead.

Image files:

* ``.png``, ``.jpg``/``.jpeg``, ``.bmp`` are read with Pillow: grayscale
  ``(H, W)`` (8 or 16 bit), RGB ``(H, W, 3)`` or RGBA ``(H, W, 4)``.
* ``.tif``/``.tiff`` are read with tifffile (first series). A file with more
  than two spatial-or-stack axes is a **stack**: every leading axis is a stack
  axis and each ``(H, W)`` plane (with its colour samples, if the file says it
  has any) is segmented on its own. Colour is decided by the file's own
  photometric tag (tifffile's ``S`` axis), never guessed from the shape.
  A file whose 3 or 4 samples are stored as separate planes (planar RGB,
  e.g. what ``tifffile.imwrite`` makes of a ``(3, H, W)`` uint8 array) is
  read as colour, and :attr:`LoadedImage.notice` says so; with
  ``channels_as_planes=True`` colour samples become stack planes instead.

Label images are written as ``uint32`` TIFF (zlib-compressed; stacks keep
their leading axes) or 16-bit PNG (2D only, ids up to 65535).

Every write goes to a hidden temporary file in the destination folder and is
then moved into place, so a reader (or a resumed batch) never sees a
half-written file: a file either exists complete or not at all. With
``replace=False`` an existing file is never replaced, even by a concurrent
writer (the file is published with a hard link, which fails if the name
exists). Files written here carry a "napari-sam" software tag
(:func:`written_by_napari_sam`), so a later run can tell its own outputs from
user files of the same name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam._files import atomic_path
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.errors import InvalidInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_EXTENSIONS",
    "LoadedImage",
    "PromptObject",
    "atomic_path",
    "check_prompts",
    "label_boundaries",
    "overlay_image",
    "read_image",
    "read_labels",
    "read_prompts",
    "write_json",
    "write_labels",
    "write_overlay",
    "written_by_napari_sam",
]

#: file name suffixes (lower case) recognised as images
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
#: suffixes a label image can be written as
LABEL_EXTENSIONS = (".tif", ".tiff", ".png")
_TIFF = (".tif", ".tiff")
#: software tag of every file written here (TIFF Software tag, PNG "Software" text chunk)
WRITER = "napari-sam"



@dataclass
class LoadedImage:
    """An image file's pixels and how to split them into 2D planes.

    Attributes:
      data: the array as stored: ``(*stack, H, W)`` or ``(*stack, H, W, C)``.
      rgb: True when the last axis holds colour samples (``C`` in 1..4).
      path: the file it was read from.
      notice: a one-line remark on how the file was interpreted, for the
        user (e.g. planar RGB read as colour), or None.
    """

    data: np.ndarray
    rgb: bool
    path: Path
    notice: str | None = None

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Shape of the leading stack axes (``()`` for a single 2D image)."""
        n = self.data.ndim - (3 if self.rgb else 2)
        return tuple(self.data.shape[:n])

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one plane."""
        n = len(self.stack_shape)
        return int(self.data.shape[n]), int(self.data.shape[n + 1])

    @property
    def is_stack(self) -> bool:
        return len(self.stack_shape) > 0

    def planes(self) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """Yield ``(index, plane)`` for every 2D plane, in C order.

        ``index`` indexes the stack axes (``()`` for a 2D image); ``plane`` is
        ``(H, W)`` or ``(H, W, C)``.
        """
        for index in np.ndindex(*self.stack_shape):
            yield index, self.data[index]

    def contrast_limits(self) -> tuple[float, float] | None:
        """Intensity range shared by all planes of a non-uint8 stack.

        Planes of one stack are normalised with the same limits so that a
        dim slice stays dim; ``None`` for uint8/bool data and for 2D images
        (their own range is used).
        """
        if not self.is_stack or self.data.dtype in (np.uint8, np.bool_):
            return None
        if self.data.dtype.kind not in "iuf":
            return None
        finite = self.data[np.isfinite(self.data)] if self.data.dtype.kind == "f" else self.data
        if finite.size == 0:
            return None
        return float(finite.min()), float(finite.max())

    def plane_rgb(self, plane: np.ndarray) -> np.ndarray:
        """One plane -> ``(H, W, 3)`` uint8 with :func:`to_rgb_uint8` (stack-wide limits)."""
        return to_rgb_uint8(plane, contrast_limits=self.contrast_limits())


def read_image(path: str | os.PathLike, channels_as_planes: bool = False) -> LoadedImage:
    """Read an image file (see the module docstring for formats and stacks).

    Arguments:
      path: the file.
      channels_as_planes: read colour samples (RGB/RGBA, of any format) as
        planes of a stack instead: ``(H, W, C)`` becomes ``(C, H, W)`` and a
        planar TIFF ``(*stack, C, H, W)`` keeps its shape.

    Raises:
      InvalidInputError: the file does not exist, has an unknown suffix, cannot
        be decoded, or its shape is not an image (e.g. 1D, empty).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise InvalidInputError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(IMAGE_EXTENSIONS)}."
        )
    planar = False
    try:
        if suffix in _TIFF:
            data, rgb, planar = _read_tiff(path)
        else:
            data, rgb = _read_pillow(path)
    except InvalidInputError:
        raise
    except Exception as err:  # decoders raise many types for corrupt files
        raise InvalidInputError(
            f"{path}: cannot read image ({type(err).__name__}: {err})."
        ) from err
    notice = None
    if rgb and channels_as_planes:
        data, rgb = np.moveaxis(data, -1, -3), False
    elif rgb and planar:
        n = data.shape[-1]
        notice = (
            f"{path.name}: its {n} planes are stored as planar {'RGBA' if n == 4 else 'RGB'} "
            "(the TIFF's photometric tag), so they are segmented as one colour image; if they "
            "are a stack (z, time or channels), pass --channels-as-planes."
        )
    spatial = data.ndim - (1 if rgb else 0)
    if spatial < 2 or data.size == 0:
        raise InvalidInputError(f"{path}: not a 2D image or stack (shape {data.shape}).")
    return LoadedImage(data=data, rgb=rgb, path=path, notice=notice)


def _read_pillow(path: Path) -> tuple[np.ndarray, bool]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        elif im.mode == "LA":
            im = im.getchannel("L")
        elif im.mode == "I;16B":
            im = im.convert("I;16")
        data = np.asarray(im)
    if data.dtype == np.int32:  # mode "I": 32-bit integer grayscale
        data = data.astype(np.int64)
    return data, data.ndim == 3


def _read_tiff(path: Path) -> tuple[np.ndarray, bool, bool]:
    """``(data, rgb, planar)``: planar when colour samples were stored as separate planes."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InvalidInputError(f"{path}: the TIFF file holds no image.")
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes
    if len(axes) != data.ndim:  # squeezed differently; fall back to the shape
        return data, False, False
    if "S" in axes:
        s = axes.index("S")
        if data.shape[s] > 4:
            raise InvalidInputError(
                f"{path}: {data.shape[s]} samples per pixel; only 1-4 (gray, RGB, RGBA) are "
                "supported."
            )
        planar = s != data.ndim - 1
        data = np.moveaxis(data, s, -1)
        if data.shape[-1] == 1:
            return data[..., 0], False, False
        return data, True, planar
    return data, False, False


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a label image written by :func:`write_labels` (any integer TIFF/PNG)."""
    path = Path(path)
    if path.suffix.lower() in _TIFF:
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def written_by_napari_sam(path: str | os.PathLike) -> bool:
    """True if ``path`` is a label image, overlay or COCO JSON written by napari-sam.

    Looks for the software tag that :func:`write_labels`, :func:`write_overlay`
    and :func:`write_json` (for COCO documents) put in their files. False for
    missing or unreadable files and for files written by other programs (or
    by napari-sam versions before the tag existed).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in _TIFF:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                software = tif.pages[0].software if len(tif.pages) else ""
            return str(software or "").startswith(WRITER)
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return str(im.info.get("Software", "")).startswith(WRITER)
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                head = f.read(200)
            return head.startswith('{"info": {"description": "' + WRITER)
    except Exception:  # unreadable or not what its suffix says: not ours
        return False
    return False


def _png_info() -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", WRITER)
    return info


def write_labels(path: str | os.PathLike, labels: np.ndarray, replace: bool = True) -> Path:
    """Write an integer label image atomically; returns ``path``.

    Arguments:
      path: ``.tif``/``.tiff`` (uint32, any number of leading stack axes,
        zlib-compressed) or ``.png`` (16-bit grayscale, 2D only).
      labels: ``(*stack, H, W)`` non-negative integer array; 0 is background.
      replace: replace an existing file; False raises FileExistsError instead
        (see :func:`atomic_path`).

    Raises:
      InvalidInputError: unsupported suffix, non-integer or negative labels,
        a stack or ids above 65535 for PNG.
      FileExistsError: ``path`` exists and ``replace`` is False.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise InvalidInputError(f"Labels must be an integer array, got dtype {labels.dtype}.")
    if labels.ndim < 2:
        raise InvalidInputError(f"Labels must be at least 2D, got shape {labels.shape}.")
    if labels.size and labels.min() < 0:
        raise InvalidInputError("Labels must be non-negative (0 = background).")
    if suffix in _TIFF:
        import tifffile

        data = labels.astype(np.uint32, copy=False)
        with atomic_path(path, replace) as tmp:
            tifffile.imwrite(tmp, data, compression="zlib", photometric="minisblack",
                             software=WRITER)
        return path
    if suffix == ".png":
        if labels.ndim != 2:
            raise InvalidInputError(
                f"A PNG holds one 2D label image, got shape {labels.shape}; write stacks as "
                ".tif (--format tif)."
            )
        if labels.size and labels.max() > 65535:
            raise InvalidInputError(
                f"{int(labels.max())} labels do not fit a 16-bit PNG (max 65535); use .tif."
            )
        from PIL import Image

        data = np.ascontiguousarray(labels, dtype=np.uint16)
        with atomic_path(path, replace) as tmp:
            Image.fromarray(data).save(tmp, format="PNG", pnginfo=_png_info())
        return path
    raise InvalidInputError(
        f"{path}: cannot write labels as {suffix or '(no suffix)'!r}; use .tif or .png."
    )


def write_json(path: str | os.PathLike, obj: Any, replace: bool = True) -> Path:
    """Write ``obj`` as JSON atomically; returns ``path`` (``replace``: see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, replace) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return path


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` labels -> bool mask of pixels on an object's inner boundary.

    A labelled pixel is a boundary pixel if one of its 4 neighbours has a
    different label (or lies outside the image).
    """
    lab = np.asarray(labels)
    padded = np.pad(lab, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(lab.shape, dtype=bool)
    h, w = lab.shape
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        edge |= padded[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] != centre
    return edge & (lab != 0)


def label_colors(ids: np.ndarray) -> np.ndarray:
    """Deterministic, well-separated RGB colours for label ids: ``(N,)`` -> ``(N, 3)`` uint8.

    Hues step by the golden ratio, so neighbouring ids get distinct colours.
    """
    ids = np.asarray(ids, dtype=np.float64)
    hue = (ids * 0.6180339887498949) % 1.0
    sat, val = 0.85, 1.0
    h6 = hue * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p = val * (1 - sat)
    q = val * (1 - sat * f)
    t = val * (1 - sat * (1 - f))
    table = np.stack(
        [
            np.choose(i, [val, q, p, p, t, val]),
            np.choose(i, [t, val, val, q, p, p]),
            np.choose(i, [p, p, t, val, val, q]),
        ],
        axis=-1,
    )
    return np.rint(table * 255).astype(np.uint8)


def overlay_image(image_rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Draw coloured object boundaries on an image.

    Arguments:
      image_rgb: ``(H, W, 3)`` uint8.
      labels: ``(H, W)`` integer labels (0 = background).

    Returns:
      ``(H, W, 3)`` uint8: the image with each object's inner boundary in its
      colour (see :func:`label_colors`).
    """
    image_rgb = np.asarray(image_rgb)
    labels = np.asarray(labels)
    if image_rgb.shape[:2] != labels.shape or image_rgb.ndim != 3:
        raise InvalidInputError(
            f"Overlay needs an (H, W, 3) image and (H, W) labels, got {image_rgb.shape} and "
            f"{labels.shape}."
        )
    out = np.array(image_rgb, dtype=np.uint8, copy=True)
    edge = label_boundaries(labels)
    if edge.any():
        ids, inverse = np.unique(labels[edge], return_inverse=True)
        out[edge] = label_colors(ids)[inverse.ravel()]
    return out


def write_overlay(
    path: str | os.PathLike, image_rgb: np.ndarray, labels: np.ndarray, replace: bool = True
) -> Path:
    """Write :func:`overlay_image` atomically.

    ``.png`` takes one ``(H, W, 3)`` image with ``(H, W)`` labels; ``.tif``
    also takes stacks ``(*stack, H, W, 3)`` with ``(*stack, H, W)`` labels.
    ``replace``: see :func:`atomic_path`.
    """
    path = Path(path)
    image_rgb = np.asarray(image_rgb)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        drawn = overlay_image(image_rgb, labels)
    else:
        drawn = np.empty(labels.shape + (3,), dtype=np.uint8)
        for index in np.ndindex(*labels.shape[:-2]):
            drawn[index] = overlay_image(image_rgb[index], labels[index])
    suffix = path.suffix.lower()
    if suffix == ".png" and drawn.ndim == 3:
        from PIL import Image

        with atomic_path(path, replace) as tmp:
            Image.fromarray(drawn).save(tmp, format="PNG", pnginfo=_png_info())
        return path
    if suffix in _TIFF:
        import tifffile

        with atomic_path(path, replace) as tmp:
            tifffile.imwrite(tmp, drawn, photometric="rgb", compression="zlib", software=WRITER)
        return path
    raise InvalidInputError(f"{path}: write overlays as .png (2D) or .tif (2D or stacks).")


# ---------------------------------------------------------------------- prompt files


@dataclass
class PromptObject:
    """Prompts for one object, in image-data pixels.

    Attributes:
      name: the object's name in the file (``object`` column / key), or its
        1-based number as a string when the file names none.
      points: ``(N, 2)`` float64 (row, col); ``N`` may be 0.
      labels: ``(N,)`` int64, 1 = foreground, 0 = background.
      box: ``(4,)`` float64 (row0, col0, row1, col1), or None.
    """

    name: str
    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None

    def describe(self, number: int) -> str:
        """``"object 3"`` or ``"object 3 ('cell7')"`` for messages (``number`` is 1-based)."""
        if self.name == str(number):
            return f"object {number}"
        return f"object {number} ({self.name!r})"


_POINT_COLS = ("row", "col")
_BOX_COLS = ("row0", "col0", "row1", "col1")
_CSV_COLS = ("object", *_POINT_COLS, "label", *_BOX_COLS)
_LABEL_WORDS = {"1": 1, "0": 0, "pos": 1, "neg": 0, "positive": 1, "negative": 0,
                "fg": 1, "bg": 0, "foreground": 1, "background": 0, "true": 1, "false": 0}


def read_prompts(path: str | os.PathLike) -> list[PromptObject]:
    """Read a prompt file (``.csv`` or ``.json``) into objects, in file order.

    CSV: a header row naming some of ``object,row,col,label,row0,col0,row1,col1``;
    every data row holds a point (``row,col`` and optionally ``label``, default
    1), a box (``row0,col0,row1,col1``), or both; cells of the other kind stay
    empty. Rows with the same ``object`` value belong to one object (at most one
    box each); without an ``object`` column each row is an object. Blank lines
    and lines starting with ``#`` are skipped.

    JSON: a list (or ``{"objects": [...]}``) of objects
    ``{"points": [[row, col], ...], "labels": [1, 0, ...], "box": [row0, col0, row1, col1],
    "name": "..."}``; every key is optional, but each object needs a point or a box;
    ``labels`` defaults to all 1.

    Raises:
      InvalidInputError: unreadable file, unknown suffix or columns, malformed
        values; messages give the line (CSV) or object number (JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such prompt file.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{path}: cannot read prompt file ({err}).") from err
    if suffix == ".csv":
        objects = _prompts_from_csv(text, path)
    elif suffix == ".json":
        objects = _prompts_from_json(text, path)
    else:
        raise InvalidInputError(f"{path}: prompt files must be .csv or .json, got {suffix!r}.")
    if not objects:
        raise InvalidInputError(f"{path}: the prompt file holds no objects.")
    return objects


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInputError(f"{where}: {what} must be a number, got {text!r}.") from None
    if not np.isfinite(value):
        raise InvalidInputError(f"{where}: {what} must be finite, got {text!r}.")
    return value


def _label(text: str, where: str) -> int:
    key = text.strip().lower()
    if key in _LABEL_WORDS:
        return _LABEL_WORDS[key]
    try:
        value = float(key)
    except ValueError:
        value = None
    if value in (0.0, 1.0):
        return int(value)
    raise InvalidInputError(
        f"{where}: label must be 1 (foreground) or 0 (background), got {text!r}."
    )


def _prompts_from_csv(text: str, path: Path) -> list[PromptObject]:
    import csv

    rows = [
        (n, row)
        for n, row in enumerate(csv.reader(text.splitlines()), start=1)
        if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")
    ]
    if not rows:
        return []
    header_line, header = rows[0]
    cols = [c.strip().lower() for c in header]
    unknown = [c for c in cols if c not in _CSV_COLS]
    if unknown:
        raise InvalidInputError(
            f"{path} line {header_line}: unknown column(s) {', '.join(map(repr, unknown))}; the "
            f"header names some of {','.join(_CSV_COLS)} (e.g. 'object,row,col,label')."
        )
    if len(set(cols)) != len(cols):
        raise InvalidInputError(f"{path} line {header_line}: a column is named twice.")
    has_point = all(c in cols for c in _POINT_COLS)
    has_box = all(c in cols for c in _BOX_COLS)
    if not (has_point or has_box):
        raise InvalidInputError(
            f"{path} line {header_line}: the header needs point columns (row,col) and/or box "
            f"columns (row0,col0,row1,col1), got {','.join(cols)}."
        )
    order: list[str] = []
    points: dict[str, list[tuple[float, float]]] = {}
    labels: dict[str, list[int]] = {}
    boxes: dict[str, tuple[float, ...]] = {}
    for n, row in rows[1:]:
        where = f"{path} line {n}"
        if len(row) > len(cols):
            raise InvalidInputError(f"{where}: {len(row)} cells but {len(cols)} columns.")
        cell = {c: (row[i].strip() if i < len(row) else "") for i, c in enumerate(cols)}
        name = cell.get("object", "") or ("" if "object" in cols else str(len(order) + 1))
        if not name:
            raise InvalidInputError(f"{where}: the object cell is empty.")
        point_cells = [cell.get(c, "") for c in _POINT_COLS]
        box_cells = [cell.get(c, "") for c in _BOX_COLS]
        if not any(point_cells) and not any(box_cells):
            raise InvalidInputError(f"{where}: the row holds neither a point nor a box.")
        if name not in points:
            order.append(name)
            points[name], labels[name] = [], []
        if any(point_cells):
            if not all(point_cells):
                raise InvalidInputError(f"{where}: a point needs both row and col.")
            r, c = (_number(v, k, where) for v, k in zip(point_cells, _POINT_COLS, strict=True))
            points[name].append((r, c))
            labels[name].append(_label(cell["label"], where) if cell.get("label") else 1)
        elif cell.get("label"):
            raise InvalidInputError(f"{where}: a label was given without a point (row, col).")
        if any(box_cells):
            if not all(box_cells):
                raise InvalidInputError(f"{where}: a box needs all of row0,col0,row1,col1.")
            if name in boxes:
                raise InvalidInputError(
                    f"{where}: object {name!r} already has a box; one box per object."
                )
            boxes[name] = tuple(
                _number(v, k, where) for v, k in zip(box_cells, _BOX_COLS, strict=True)
            )
    return [
        PromptObject(
            name=name,
            points=np.asarray(points[name], dtype=np.float64).reshape(-1, 2),
            labels=np.asarray(labels[name], dtype=np.int64),
            box=np.asarray(boxes[name], dtype=np.float64) if name in boxes else None,
        )
        for name in order
    ]


def _prompts_from_json(text: str, path: Path) -> list[PromptObject]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{path}: invalid JSON ({err}).") from err
    if isinstance(doc, dict) and "objects" in doc:
        doc = doc["objects"]
    if not isinstance(doc, list):
        raise InvalidInputError(
            f"{path}: expected a list of objects like "
            '[{"points": [[row, col]], "labels": [1], "box": [row0, col0, row1, col1]}].'
        )
    objects = []
    for i, item in enumerate(doc, start=1):
        where = f"{path} object {i}"
        if not isinstance(item, dict):
            raise InvalidInputError(f"{where}: expected a JSON object, got {type(item).__name__}.")
        unknown = set(item) - {"points", "labels", "box", "name", "object"}
        if unknown:
            raise InvalidInputError(
                f"{where}: unknown key(s) {', '.join(sorted(map(repr, unknown)))}; use points, "
                "labels, box, name."
            )
        name = str(item.get("name", item.get("object", i)))
        try:
            pts = np.asarray(item.get("points") or [], dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{where}: points must be [[row, col], ...].") from None
        if pts.size == 0:
            pts = pts.reshape(0, 2)
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise InvalidInputError(f"{where}: points must be [[row, col], ...] of numbers.")
        raw_labels = item.get("labels")
        if raw_labels is None:
            lab = np.ones(len(pts), dtype=np.int64)
        else:
            if not isinstance(raw_labels, list) or len(raw_labels) != len(pts):
                raise InvalidInputError(
                    f"{where}: labels must be a list with one entry per point ({len(pts)})."
                )
            lab = np.asarray([_label(str(v), where) for v in raw_labels], dtype=np.int64)
        box = item.get("box")
        if box is not None:
            try:
                box = np.asarray(box, dtype=np.float64)
            except (TypeError, ValueError):
                box = np.zeros(0)
            if box.shape != (4,) or not np.isfinite(box).all():
                raise InvalidInputError(f"{where}: box must be [row0, col0, row1, col1].")
        if len(pts) == 0 and box is None:
            raise InvalidInputError(f"{where}: give at least one point or a box.")
        objects.append(PromptObject(name=name, points=pts, labels=lab, box=box))
    return objects


def check_prompts(objects: list[PromptObject], shape: tuple[int, int]) -> None:
    """Check every object against an image of ``shape = (H, W)``.

    Points must lie in ``[0, H) x [0, W)``; boxes need a non-zero height and
    width and must overlap the image (corners may come in any order, like
    :meth:`~napari_sam.engine.predictor.Predictor.predict`).

    Raises:
      InvalidInputError: naming the object by number (1-based) and name.
    """
    h, w = int(shape[0]), int(shape[1])
    for number, obj in enumerate(objects, start=1):
        for (r, c) in obj.points:
            if not (0 <= r < h and 0 <= c < w):
                raise InvalidInputError(
                    f"{obj.describe(number)}: point (row {r:g}, col {c:g}) is outside the image "
                    f"of {h} x {w} pixels (rows 0..{h - 1}, cols 0..{w - 1})."
                )
        if obj.box is not None:
            r0, c0, r1, c1 = obj.box
            rlo, rhi, clo, chi = min(r0, r1), max(r0, r1), min(c0, c1), max(c0, c1)
            if rhi == rlo or chi == clo:
                raise InvalidInputError(
                    f"{obj.describe(number)}: the box has zero height or width."
                )
            if rhi < 0 or chi < 0 or rlo >= h or clo >= w:
                raise InvalidInputError(
                    f"{obj.describe(number)}: box (row0 {r0:g}, col0 {c0:g}, row1 {r1:g}, "
                    f"col1 {c1:g}) does not overlap the image of {h} x {w} pixels."
                )
