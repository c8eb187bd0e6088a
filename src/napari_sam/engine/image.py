"""Image normalisation: any 2D image layer data -> (H, W, 3) uint8 RGB.

This is the one function every path (Predictor, everything-mode, widgets,
training, evaluation) uses to turn user data into what SAM expects, so that an
embedding computed in one place is valid in every other.

Rules, in order:

* **Shape.** ``(H, W)`` is grayscale and is copied into R, G and B.
  ``(H, W, 3)`` is RGB and ``(H, W, 4)`` is RGBA (alpha is dropped).
  ``(H, W, 1)`` is grayscale. Any other 3D shape is ambiguous (a stack of 2D
  planes?) and raises, unless ``channel_axis`` names the channel axis; then
  1 channel -> gray, 2 channels -> R, G with B = 0, 3 channels -> RGB,
  4 channels -> the first three (RGBA-style, the 4th is dropped), and more than
  4 channels raise (pick up to three channels yourself, e.g.
  ``image[..., [0, 2, 5]]``).
* **Intensity.** ``bool`` maps False/True to 0/255. ``uint8`` is kept as is.
  Every other real dtype (and ``uint8``/``bool`` when ``contrast_limits`` are
  given) is mapped linearly from ``contrast_limits = (lo, hi)`` to 0..255,
  rounded to nearest and clipped. Without contrast limits, ``lo, hi`` are the
  minimum and maximum of the data (over all channels, so colour balance is
  kept). When ``hi == lo`` the map is a step: values ``> lo`` become 255, the
  rest 0, so a constant image becomes all zeros. The map is computed without
  overflow for any finite range, including ranges as wide as float64 allows
  (e.g. ``-1e308..1e308``).
* **Errors** (:class:`~napari_sam.errors.InvalidInputError`): empty arrays,
  wrong number of dimensions, NaN or inf values, complex, object and string
  dtypes, and invalid contrast limits.
"""

from __future__ import annotations

import math

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = ["to_rgb_uint8"]

# dtypes whose values are exactly representable in float32 (cheaper to map)
_FLOAT32_SAFE = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.float16)}


def to_rgb_uint8(
    image: np.ndarray,
    contrast_limits: tuple[float, float] | None = None,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Normalise ``image`` to a C-contiguous ``(H, W, 3)`` uint8 RGB array.

    Arguments:
      image: 2D grayscale ``(H, W)``, RGB ``(H, W, 3)``, RGBA ``(H, W, 4)``, or
        a 3D array with ``channel_axis`` set. Any array-like (numpy, dask,
        CPU torch tensor) is accepted and read with ``np.asarray``.
      contrast_limits: ``(lo, hi)`` data values mapped to 0 and 255, e.g. a
        napari layer's ``contrast_limits``. ``None`` uses the data range for
        non-uint8 data and leaves uint8 data unchanged.
      channel_axis: axis of ``image`` holding channels (napari's
        ``channel_axis``); see the module docstring for the channel mapping.

    Returns:
      ``(H, W, 3)`` uint8 array (a new array; the input is never modified).

    Raises:
      InvalidInputError: see the module docstring.
    """
    arr = np.asarray(image)
    _check_dtype(arr.dtype)
    arr = _to_hwc(arr, channel_axis)
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InvalidInputError(
            f"The image is empty (shape {arr.shape}); pass an image with at least 1x1 pixels."
        )
    lims = _check_limits(contrast_limits)

    if arr.dtype == np.bool_ and lims is None:
        arr = arr.view(np.uint8) * np.uint8(255)
    elif arr.dtype != np.uint8 or lims is not None:
        arr = _rescale(arr, lims)
    return _to_three_channels(arr)


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind == "c":
        raise InvalidInputError(
            f"Complex images ({dtype}) are not supported; pass np.abs(image) or image.real."
        )
    if dtype.kind not in "biuf":
        raise InvalidInputError(
            f"Unsupported image dtype {dtype}; pass a numeric (bool, integer or float) array, "
            "e.g. np.asarray(image, dtype=float)."
        )


def _to_hwc(arr: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """Return a (H, W, C) view of ``arr`` (C >= 1)."""
    if channel_axis is not None:
        if arr.ndim != 3:
            raise InvalidInputError(
                f"channel_axis={channel_axis} needs a 3D array (two spatial axes and one channel "
                f"axis), got shape {arr.shape}; for a stack, pass one 2D plane (with channels) "
                "at a time."
            )
        if not -3 <= channel_axis < 3:
            raise InvalidInputError(
                f"channel_axis={channel_axis} is out of range for a 3D image of shape {arr.shape}."
            )
        arr = np.moveaxis(arr, channel_axis, -1)
        if arr.shape[2] > 4:
            raise InvalidInputError(
                f"The image has {arr.shape[2]} channels; SAM takes at most 3. Select up to three "
                "channels, e.g. image[..., [0, 2, 5]] (channels last)."
            )
        return arr
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        return arr
    if arr.ndim == 3:
        raise InvalidInputError(
            f"Got a 3D array of shape {arr.shape}, which is neither RGB(A) (H, W, 3|4) nor "
            "grayscale. If it is a stack (Z, Y, X), pass one 2D slice, e.g. image[z]; if one axis "
            "holds channels, pass channel_axis=<that axis>."
        )
    raise InvalidInputError(
        f"Expected a 2D image (H, W) or an RGB(A) image (H, W, 3|4), got {arr.ndim}D data of "
        f"shape {arr.shape}. Pass a single 2D slice, e.g. image[t, z] for a (T, Z, Y, X) stack."
    )


def _check_limits(contrast_limits: tuple[float, float] | None) -> tuple[float, float] | None:
    if contrast_limits is None:
        return None
    try:
        lo, hi = (float(v) for v in contrast_limits)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(
            f"contrast_limits must be two numbers (lo, hi), got {contrast_limits!r}."
        ) from err
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InvalidInputError(f"contrast_limits must be finite, got ({lo}, {hi}).")
    if hi < lo:
        raise InvalidInputError(
            f"contrast_limits must satisfy lo <= hi, got ({lo}, {hi}); swap them."
        )
    return lo, hi


def _rescale(arr: np.ndarray, lims: tuple[float, float] | None) -> np.ndarray:
    """Linear map of ``lims`` (default: finite data range) to 0..255 uint8."""
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise InvalidInputError(
            f"The image contains {n_nan} NaN and {n_inf} infinite values; replace them first, "
            "e.g. np.nan_to_num(image, nan=0.0, posinf=..., neginf=...)."
        )
    if lims is None:
        lims = (float(arr.min()), float(arr.max()))
    lo, hi = lims
    ftype = np.float32 if arr.dtype in _FLOAT32_SAFE else np.float64
    if hi == lo:  # degenerate range: a step at lo (constant image -> zeros)
        return np.where(arr > lo, np.uint8(255), np.uint8(0))
    span = hi - lo
    if not (math.isfinite(span) and math.isfinite(255.0 / span)):
        return _rescale_extreme(arr, lo, hi)
    out = arr.astype(ftype)
    out -= ftype(lo)
    out *= ftype(255.0 / span)
    np.clip(out, 0.0, 255.0, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def _rescale_extreme(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The map of :func:`_rescale` for ranges at the ends of float64.

    A range wider than the largest float64 (e.g. -1e308..1e308) overflows ``hi - lo``:
    halve every value first (exact in binary floating point). A range so narrow that
    ``255 / (hi - lo)`` overflows: divide by the range instead of multiplying by its
    inverse. Values beyond the range may still overflow to +-inf, which the clip maps to
    0 or 255 like any other value outside the limits.
    """
    out = arr.astype(np.float64)
    with np.errstate(over="ignore"):
        if not math.isfinite(hi - lo):
            out *= 0.5
            lo, hi = lo * 0.5, hi * 0.5
        out -= lo
        out /= hi - lo
        out *= 255.0
    np.clip(out, 0.0, 255.0, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def _to_three_channels(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> contiguous (H, W, 3) uint8 (see module docstring)."""
    h, w, c = arr.shape
    if c == 1:
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[...] = arr
        return out
    if c == 2:
        out = np.zeros((h, w, 3), dtype=np.uint8)
        out[:, :, :2] = arr
        return out
    return np.array(arr[:, :, :3], dtype=np.uint8, order="C", copy=True)
