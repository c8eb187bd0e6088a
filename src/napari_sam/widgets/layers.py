"""Pure helpers between napari layers and the engine (no Qt, no torch).

Coordinate convention: everything returned here is in the *image layer's data
coordinates*, napari/numpy order: points ``(row, col)``, boxes
``(row0, col0, row1, col1)``. Points and Shapes live in their own data frames;
they are mapped to world coordinates with their transforms and then to the image
data frame with the image layer's inverse transform (scale, translate, rotate,
shear, affine), so prompt layers never need to share the image's transform.

An image layer of ``ndim`` dimensions (RGB channel excluded) is segmented one 2D
plane at a time: the last two axes are the plane, the leading ``ndim - 2`` axes
pick the slice (``slice_index``, a tuple of ints, empty for 2D images).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = [
    "MAX_PLANE_PIXELS",
    "check_plane_displayed",
    "check_segmentable",
    "commit_mask",
    "commit_object",
    "current_slice_index",
    "data_affine",
    "get_image_plane",
    "image_plane_shape",
    "labels_fit_image",
    "make_labels_layer",
    "make_plane_labels_layer",
    "plane_affine",
    "points_to_prompts",
    "shapes_on_plane",
    "shapes_to_boxes",
    "spatial_shape",
    "unique_name",
]

# feature column of the prompt Points layer: True = positive (foreground) click
POSITIVE_FEATURE = "positive"
# largest 2D plane the widgets accept (8192 x 8192): the encoder sees 1024 px anyway
MAX_PLANE_PIXELS = 8192 * 8192


# ---------------------------------------------------------------------------
# image geometry


def spatial_shape(image_layer: Any) -> tuple[int, ...]:
    """Shape of the image layer's data without the RGB(A) channel axis."""
    shape = tuple(int(s) for s in _base_data(image_layer).shape)
    return shape[:-1] if getattr(image_layer, "rgb", False) else shape


def image_plane_shape(image_layer: Any) -> tuple[int, int]:
    """``(H, W)`` of one 2D plane of the image layer (its last two spatial axes)."""
    shape = spatial_shape(image_layer)
    if len(shape) < 2:
        raise InvalidInputError(
            f"Layer {image_layer.name!r} has {len(shape)} dimension(s); SAM needs at least a 2D "
            "image."
        )
    return shape[-2], shape[-1]


def _base_data(image_layer: Any) -> Any:
    if getattr(image_layer, "multiscale", False):
        raise InvalidInputError(
            f"Layer {image_layer.name!r} is multiscale (a pyramid), which is not supported yet; "
            "add its full-resolution level as a plain image layer, e.g. "
            "viewer.add_image(layer.data[0])."
        )
    return image_layer.data


def check_segmentable(image_layer: Any) -> None:
    """Raise :class:`InvalidInputError` (with advice) if the widgets cannot segment the layer."""
    shape = spatial_shape(image_layer)
    h, w = image_plane_shape(image_layer)
    if not getattr(image_layer, "rgb", False) and len(shape) >= 3 and w in (3, 4):
        raise InvalidInputError(
            f"Layer {image_layer.name!r} has shape {shape}: its last axis looks like {w} colour "
            f"channels, but napari shows it as a stack of {h} x {w} images. Open it as RGB "
            "(viewer.add_image(data, rgb=True)) or split the channels "
            "(viewer.add_image(data, channel_axis=-1)) and segment one channel."
        )
    if h * w > MAX_PLANE_PIXELS:
        raise InvalidInputError(
            f"Layer {image_layer.name!r} has {h} x {w} pixel planes, more than the "
            f"{MAX_PLANE_PIXELS} pixels the widgets accept. Segment a crop or a downsampled copy, "
            "e.g. viewer.add_image(data[..., ::4, ::4], scale=(4, 4))."
        )
    dtype = np.dtype(image_layer.data.dtype)
    if dtype.kind not in "biuf":
        raise InvalidInputError(
            f"Layer {image_layer.name!r} has dtype {dtype}; SAM needs numeric images."
        )


def check_plane_displayed(image_layer: Any, dims: Any) -> None:
    """Raise unless the viewer shows a 2D view of the image layer's last two axes.

    Arguments:
      image_layer: a napari Image layer.
      dims: ``viewer.dims`` (uses ``ndim``, ``ndisplay`` and ``displayed``).
    """
    if dims.ndisplay != 2:
        raise InvalidInputError(
            "Segment Anything works on 2D views; switch the viewer to 2D (the 2D/3D button at "
            "the bottom left, or Ctrl+Y)."
        )
    n = len(spatial_shape(image_layer))
    world_axes = {dims.ndim - 2, dims.ndim - 1}
    if n < 2 or set(dims.displayed) != world_axes:
        raise InvalidInputError(
            f"The viewer does not show the last two axes of {image_layer.name!r}; roll the "
            "dimensions back (the 'roll dimensions' button) so the image plane (rows, columns) "
            "is displayed."
        )


def current_slice_index(image_layer: Any, world_point: Sequence[float]) -> tuple[int, ...]:
    """Index of the 2D plane of ``image_layer`` shown at ``world_point``.

    Arguments:
      image_layer: a napari Image (or Labels) layer of ``ndim`` spatial dims.
      world_point: the viewer's position in world coordinates (``viewer.dims.point``);
        it may have more dims than the layer (leading extra dims are ignored, as napari
        aligns layers on their trailing axes).

    Returns:
      ``ndim - 2`` ints (empty for a 2D image): the data index of each leading axis.

    Raises:
      InvalidInputError: the shown position lies outside the layer's extent.
    """
    shape = spatial_shape(image_layer)
    n_lead = len(shape) - 2
    if n_lead <= 0:
        return ()
    data = np.asarray(image_layer.world_to_data(np.asarray(world_point, dtype=float)))
    lead = np.round(data[:n_lead]).astype(int)
    for axis, (i, size) in enumerate(zip(lead, shape[:n_lead], strict=True)):
        if not 0 <= i < size:
            raise InvalidInputError(
                f"The viewer shows slice {int(i)} of axis {axis}, outside {image_layer.name!r} "
                f"(size {size}); move the slider onto the image."
            )
    return tuple(int(i) for i in lead)


def get_image_plane(image_layer: Any, slice_index: Sequence[int] = ()) -> np.ndarray:
    """The 2D plane ``data[slice_index]`` as numpy: ``(H, W)`` or ``(H, W, C)`` for RGB(A)."""
    data = _base_data(image_layer)
    plane = data[tuple(int(i) for i in slice_index)] if len(slice_index) else data
    return np.asarray(plane)


# ---------------------------------------------------------------------------
# prompts


def _to_image_data(layer: Any, coords: np.ndarray, image_layer: Any) -> np.ndarray:
    """Map (N, layer.ndim) data coords of ``layer`` to (N, image ndim) image data coords."""
    n_img = len(spatial_shape(image_layer))
    out = np.empty((len(coords), n_img), dtype=float)
    for k, c in enumerate(coords):
        world = np.asarray(layer.data_to_world(np.asarray(c, dtype=float)), dtype=float)
        out[k] = np.asarray(image_layer.world_to_data(world), dtype=float)[-n_img:]
    return out


def _on_slice(
    data_coords: np.ndarray, slice_index: Sequence[int], n_checked: int
) -> np.ndarray:
    """Mask of rows whose leading coords round to ``slice_index``.

    Only the last ``n_checked`` leading axes are compared (a prompt layer with fewer
    dims than the image shows its prompts on every slice of the missing axes).
    """
    n_lead = len(slice_index)
    if n_lead == 0 or n_checked <= 0 or len(data_coords) == 0:
        return np.ones(len(data_coords), dtype=bool)
    lead = data_coords[:, n_lead - n_checked : n_lead]
    target = np.asarray(slice_index[n_lead - n_checked :], dtype=float)
    return np.all(np.abs(lead - target) < 0.5, axis=1)


def points_to_prompts(
    points_layer: Any,
    image_layer: Any,
    slice_index: Sequence[int] = (),
    label_feature: str = POSITIVE_FEATURE,
) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts on the current plane, in image data coordinates.

    Arguments:
      points_layer: napari Points layer (any transform, any ndim).
      image_layer: the image layer being segmented.
      slice_index: the plane of the image (see :func:`current_slice_index`).
      label_feature: boolean feature column; True (or missing column) = positive.

    Returns:
      coords: ``(N, 2)`` float ``(row, col)`` in image data pixels.
      labels: ``(N,)`` int32, 1 positive, 0 negative.
      Points on other slices are left out.
    """
    data = np.asarray(points_layer.data, dtype=float).reshape(-1, points_layer.ndim)
    if len(data) == 0:
        return np.zeros((0, 2)), np.zeros((0,), dtype=np.int32)
    if label_feature in points_layer.features:
        labels = np.asarray(points_layer.features[label_feature], dtype=bool).astype(np.int32)
    else:
        labels = np.ones(len(data), dtype=np.int32)
    coords = _to_image_data(points_layer, data, image_layer)
    n_checked = min(len(slice_index), points_layer.ndim - 2)
    keep = _on_slice(coords, slice_index, n_checked)
    return coords[keep, -2:], labels[keep]


def shapes_on_plane(
    shapes_layer: Any, image_layer: Any, slice_index: Sequence[int] = ()
) -> np.ndarray:
    """``(M,)`` bool: which shapes of ``shapes_layer`` lie on the image plane ``slice_index``.

    A shape belongs to the plane of its first vertex (rectangles are drawn on one
    plane); a layer with fewer dims than the image shows its shapes on every plane.
    """
    n_checked = min(len(slice_index), shapes_layer.ndim - 2)
    flags = []
    for verts in shapes_layer.data:
        verts = np.asarray(verts, dtype=float)
        if len(verts) == 0:
            flags.append(False)
            continue
        coords = _to_image_data(shapes_layer, verts[:1], image_layer)
        flags.append(bool(_on_slice(coords, slice_index, n_checked)[0]))
    return np.asarray(flags, dtype=bool)


def shapes_to_boxes(
    shapes_layer: Any, image_layer: Any, slice_index: Sequence[int] = ()
) -> np.ndarray:
    """Box prompts on the current plane, in image data coordinates.

    Every shape becomes the axis-aligned bounding box of its vertices after mapping
    them to the image's data frame, so rectangles map exactly and rotated
    rectangles (or other shapes) map to their bounding boxes.

    Returns:
      ``(M, 4)`` float ``(row0, col0, row1, col1)`` with ``row0 <= row1``,
      ``col0 <= col1``, in the order the shapes were drawn; shapes on other slices
      are left out.
    """
    boxes = []
    on_plane = shapes_on_plane(shapes_layer, image_layer, slice_index)
    for verts, here in zip(shapes_layer.data, on_plane, strict=True):
        if not here:
            continue
        coords = _to_image_data(shapes_layer, np.asarray(verts, dtype=float), image_layer)
        rc = coords[:, -2:]
        lo, hi = rc.min(axis=0), rc.max(axis=0)
        boxes.append([lo[0], lo[1], hi[0], hi[1]])
    return np.asarray(boxes, dtype=float).reshape(-1, 4)


# ---------------------------------------------------------------------------
# labels


def make_labels_layer(image_layer: Any, name: str, dtype: Any = np.uint32) -> Any:
    """A new (not yet added) napari Labels layer matching ``image_layer``.

    Same spatial shape (RGB channel dropped) and the same transform (scale,
    translate, rotate, shear, affine, units, axis labels), so a label pixel sits
    exactly on its image pixel.
    """
    from napari.layers import Labels

    kwargs: dict[str, Any] = {
        "scale": image_layer.scale,
        "translate": image_layer.translate,
        "rotate": image_layer.rotate,
        "shear": image_layer.shear,
        "affine": image_layer.affine.affine_matrix,
    }
    for attr in ("axis_labels", "units"):
        if hasattr(image_layer, attr):
            kwargs[attr] = getattr(image_layer, attr)
    return Labels(np.zeros(spatial_shape(image_layer), dtype=dtype), name=name, **kwargs)


def plane_affine(image_layer: Any, slice_index: Sequence[int] = ()) -> np.ndarray:
    """(3, 3) affine from the plane's ``(row, col)`` data pixels to the last two world axes.

    Built from the layer's public ``data_to_world`` (so scale, translate, rotate,
    shear and affine all count) at the given slice.
    """
    lead = [float(i) for i in slice_index]

    def world(r: float, c: float) -> np.ndarray:
        return np.asarray(image_layer.data_to_world([*lead, r, c]), dtype=float)[-2:]

    origin = world(0.0, 0.0)
    mat = np.eye(3)
    mat[:2, 0] = world(1.0, 0.0) - origin
    mat[:2, 1] = world(0.0, 1.0) - origin
    mat[:2, 2] = origin
    return mat


def data_affine(image_layer: Any, offset: Sequence[float] | None = None) -> np.ndarray:
    """(n+1, n+1) affine from the image's ``n`` data axes (RGB channel excluded) to world,
    for an array whose first pixel sits at data index ``offset`` (None: the origin).

    Built from the layer's public ``data_to_world`` like :func:`plane_affine`, so scale
    (anisotropic voxels included), translate, rotate, shear and affine all count; a
    layer with only this affine lies exactly on the image (e.g. a preview crop).
    """
    n = len(spatial_shape(image_layer))
    base = np.zeros(n) if offset is None else np.asarray(offset, dtype=float)
    if base.shape != (n,):
        raise InvalidInputError(f"offset must have {n} values, got {tuple(base.shape)}.")

    def world(point: np.ndarray) -> np.ndarray:
        return np.asarray(image_layer.data_to_world(point), dtype=float)[-n:]

    origin = world(base)
    mat = np.eye(n + 1)
    for axis in range(n):
        step = base.copy()
        step[axis] += 1.0
        mat[:n, axis] = world(step) - origin
    mat[:n, n] = origin
    return mat


def make_plane_labels_layer(
    image_layer: Any, slice_index: Sequence[int], name: str, dtype: Any = np.uint8
) -> Any:
    """A new 2D Labels layer over one plane of ``image_layer`` (e.g. a preview)."""
    from napari.layers import Labels

    return Labels(
        np.zeros(image_plane_shape(image_layer), dtype=dtype),
        name=name,
        affine=plane_affine(image_layer, slice_index),
    )


def labels_fit_image(labels_layer: Any, image_layer: Any) -> bool:
    """Whether ``labels_layer`` has the image's spatial shape (so indices line up)."""
    return tuple(labels_layer.data.shape) == spatial_shape(image_layer)


def unique_name(existing: Iterable[str], base: str) -> str:
    """``base``, or ``base [2]``, ``base [3]``, ... whichever is not in ``existing``."""
    names = set(existing)
    if base not in names:
        return base
    k = 2
    while f"{base} [{k}]" in names:
        k += 1
    return f"{base} [{k}]"


def commit_mask(
    labels_layer: Any,
    mask2d: np.ndarray,
    slice_index: Sequence[int] = (),
    overwrite: bool = False,
    offset: tuple[int, int] | None = None,
) -> int:
    """Write a mask into ``labels_layer`` as a new object; undoable with ``layer.undo()``.

    Arguments:
      labels_layer: napari Labels layer of shape ``(*lead, H, W)``.
      mask2d: ``(H, W)`` bool mask of the whole plane in the labels' data pixels, or
        with ``offset`` an ``(h, w)`` crop of it (e.g. the object's bounding box).
      slice_index: the plane to write (``len(lead)`` ints).
      overwrite: if False (default) pixels that already hold a label keep it;
        if True the new object replaces them.
      offset: ``(row0, col0)`` of the crop's first pixel in the plane; None (default):
        ``mask2d`` must have the plane's shape.

    Returns:
      The new label id (``max(labels) + 1``), or 0 when nothing was written
      (empty mask, or every pixel already taken).

    The write is one ``Labels.data_setitem`` call, i.e. one undo step. Only the
    crop's region of the plane is read, so the cost follows the object's size
    (plus one pass over the labels for the largest id).
    """
    mask = np.asarray(mask2d, dtype=bool)
    data = labels_layer.data
    lead = tuple(int(i) for i in slice_index)
    r0, c0 = (0, 0) if offset is None else (int(v) for v in offset)
    plane = tuple(int(s) for s in data.shape[len(lead):])
    fits = (
        mask.ndim == 2
        and len(lead) + 2 == data.ndim
        and (offset is not None or mask.shape == plane)
        and r0 >= 0
        and c0 >= 0
        and r0 + mask.shape[0] <= plane[0]
        and c0 + mask.shape[1] <= plane[1]
    )
    if not fits:
        where = "" if offset is None else f" at offset {(r0, c0)}"
        raise InvalidInputError(
            f"Mask of shape {mask.shape}{where} at slice {lead} does not fit labels layer "
            f"{labels_layer.name!r} of shape {tuple(data.shape)}; pick a labels layer with the "
            "image's shape (or let the widget create one)."
        )
    for i, size in zip(lead, data.shape, strict=False):
        if not 0 <= i < size:
            raise InvalidInputError(f"Slice {lead} is outside labels of shape {data.shape}.")
    crop = mask.reshape((1,) * len(lead) + mask.shape)
    return commit_object(labels_layer, crop, (*lead, r0, c0), overwrite=overwrite)


def commit_object(
    labels_layer: Any,
    mask: np.ndarray,
    offset: Sequence[int],
    overwrite: bool = False,
    label_id: int | None = None,
) -> int:
    """Write an nD mask crop into ``labels_layer`` as one object, in ONE undo step.

    Arguments:
      labels_layer: napari Labels layer of ``n`` dims.
      mask: ``n``-dim bool crop (e.g. a propagated object's bounding box through z
        or t, with size 1 along the other stack axes).
      offset: ``n`` ints, the data index of the crop's first pixel.
      overwrite: as :func:`commit_mask`.
      label_id: the id to write (an existing object extended through the stack);
        None: a new id, ``max(labels) + 1``.

    Returns the id written, or 0 when nothing was written. The write is one
    ``Labels.data_setitem`` call, so ``layer.undo()`` removes the whole object.
    """
    mask = np.asarray(mask, dtype=bool)
    data = labels_layer.data
    start = tuple(int(v) for v in offset)
    if mask.ndim != data.ndim or len(start) != data.ndim or any(
        o < 0 or o + m > s for o, m, s in zip(start, mask.shape, data.shape, strict=True)
    ):
        raise InvalidInputError(
            f"An object of shape {mask.shape} at {start} does not fit labels layer "
            f"{labels_layer.name!r} of shape {tuple(data.shape)}; pick a labels layer with the "
            "image's shape (or let the widget create one)."
        )
    region = tuple(slice(o, o + m) for o, m in zip(start, mask.shape, strict=True))
    if not overwrite:
        mask = mask & (np.asarray(data[region]) == 0)
    if not mask.any():
        return 0
    dtype = np.dtype(data.dtype)
    if label_id is None:
        current_max = int(np.max(data)) if data.size else 0
        new_id = current_max + 1
        if dtype.kind in "iu" and new_id > np.iinfo(dtype).max:
            raise InvalidInputError(
                f"Labels layer {labels_layer.name!r} ({dtype}) has no free id above "
                f"{current_max}; convert it to uint32, e.g. "
                "layer.data = layer.data.astype('uint32')."
            )
    else:
        new_id = int(label_id)
        if new_id < 1 or (dtype.kind in "iu" and new_id > np.iinfo(dtype).max):
            raise InvalidInputError(f"Label id {new_id} does not fit labels of dtype {dtype}.")
    indices = tuple(
        idx.astype(np.intp) + o for idx, o in zip(np.nonzero(mask), start, strict=True)
    )
    labels_layer.data_setitem(indices, new_id)
    return new_id


def source_path(layer: Any) -> str | None:
    """The file an image layer was opened from, or None."""
    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path else None
