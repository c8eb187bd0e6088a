"""How the live preview looks (pure numpy; no Qt, no napari).

The preview must not look like a committed object. Committed objects are filled
with napari's label colours (pseudo-random hues, no outline); the preview is drawn in
one fixed colour, :data:`PREVIEW_RGB` (pure cyan), with an opaque outline and by
default a light fill:

* no colour of napari's default label colormap is close to it (the nearest of the
  first 2000 ids is 0.39 away in RGB; only pure greens, taken by the positive points,
  are farther from all of them);
* cyan keeps its contrast on dark fluorescence (it is bright) and on brightfield
  stains (brown DAB, purple haematoxylin/eosin are far from it in hue);
* it differs in hue from the prompt points (positive lime, negative red);
* the outline distinguishes it from a filled label even where a label colour
  happens to be close.

The preview layer holds only the mask's bounding box (see :func:`render_preview`),
so showing a preview costs the object's size, not the image's.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FILL",
    "NEGATIVE_COLOR",
    "OUTLINE",
    "POSITIVE_COLOR",
    "PREVIEW_RGB",
    "PREVIEW_STYLES",
    "outline_width",
    "preview_colors",
    "render_preview",
]

PREVIEW_RGB = (0.0, 1.0, 1.0)
POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"
FILL_ALPHA = 0.35
# values of the preview layer's pixels
FILL = 1
OUTLINE = 2
# style name -> (draw the fill, draw the outline)
PREVIEW_STYLES: dict[str, tuple[bool, bool]] = {
    "outline + fill": (True, True),
    "outline": (False, True),
    "fill": (True, False),
}
DEFAULT_STYLE = "outline + fill"


def preview_colors() -> dict[int | None, tuple[float, float, float, float]]:
    """RGBA colour of each preview pixel value (for a napari ``DirectLabelColormap``)."""
    clear = (0.0, 0.0, 0.0, 0.0)
    return {
        None: clear,
        0: clear,
        FILL: (*PREVIEW_RGB, FILL_ALPHA),
        OUTLINE: (*PREVIEW_RGB, 1.0),
    }


def outline_width(plane_shape: tuple[int, int]) -> int:
    """Outline width in image pixels: about 2 screen pixels when the plane fits an
    800-pixel view (1 px up to 600 px images, 20 px for 8000 px)."""
    return max(1, int(round(max(plane_shape) / 400)))


def render_preview(mask_crop: np.ndarray, style: str = DEFAULT_STYLE, width: int = 1) -> np.ndarray:
    """Pixel values of the preview layer for a cropped ``(h, w)`` bool mask.

    Returns ``(h, w)`` uint8: 0 outside, :data:`FILL` inside, :data:`OUTLINE` on
    the ``width``-pixel inner border (pixels of the mask within ``width`` of
    a background pixel or of the crop's edge). ``style`` is a key of
    :data:`PREVIEW_STYLES`.
    """
    if style not in PREVIEW_STYLES:
        raise ValueError(f"Unknown preview style {style!r}; choose from {list(PREVIEW_STYLES)}.")
    fill, outline = PREVIEW_STYLES[style]
    mask = np.asarray(mask_crop, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.uint8)
    if mask.size == 0:
        return out
    if fill:
        out[mask] = FILL
    if outline:
        from scipy import ndimage

        # a square erosion done as a separable running minimum: O(pixels) for any width
        inner = ndimage.minimum_filter(
            mask.view(np.uint8), size=2 * int(width) + 1, mode="constant", cval=0
        ).astype(bool)
        out[mask & ~inner] = OUTLINE
    return out
