"""Seeded data augmentation for (image, instance labels) pairs (numpy).

Order inside :meth:`napari_sam.training.datasets.InstanceDataset.sample`:

1. the view: a random crop at a random scale (the dataset's ``scale_range``) or
   the whole image;
2. geometry (:func:`augment_geometry`: flips, 90 degree rotations) on image and
   labels together;
3. the resize to the model input, or instead the **zoom** family
   (:func:`zoom_view`): the view's content zoomed by 0.25-4x while the frame the
   dataset needs keeps its size (labels nearest-sampled, a mirrored mosaic
   with distinct ids when zoomed out);
4. intensity (:func:`augment_intensity`) on float32 RGB values in 0..255, the
   image only: an appearance family (brightfield look or H&E-like colour, at
   most one), then the basic chain (gamma, inversion, channel shuffle,
   contrast, brightness, blur, Gaussian noise), anisotropic blur, anisotropic
   noise, and last the **bit depth** family: the view is turned into a 16-bit
   or float image and normalised back by
   :func:`napari_sam.engine.image.to_rgb_uint8`, the function every inference
   path uses, so training sees what inference sees for such data.

Every probability and range lives in :class:`AugmentConfig` (one owner).
``AugmentConfig()`` is the ``"basic"`` preset (the augmentation of every run so
far: the families added for generalisation are off); ``AugmentConfig.preset
("general")`` turns them on. A family whose probability is 0 draws no random
number, so the basic preset's samples are those of earlier versions, bit for
bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from napari_sam.errors import InvalidInputError

__all__ = [
    "PRESETS",
    "AugmentConfig",
    "augment_bit_depth",
    "augment_geometry",
    "augment_intensity",
    "brightfield_look",
    "draw_zoom",
    "he_look",
    "nearest_indices",
    "raw_user_image",
    "resize_pair",
    "zoom_view",
]

#: the named augmentation presets (``TrainConfig.augment_preset``, ``train --augment``)
PRESETS = ("basic", "general")

# Optical densities per unit stain of R, G, B (Beer-Lambert: transmitted = exp(-OD)).
# Hematoxylin after Ruifrok & Johnston (2001); eosin chosen so that it absorbs green
# most and blue more than red: pink (R > B > G) on a white background.
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
_EOSIN_OD = np.array([0.22, 0.80, 0.56])


@dataclasses.dataclass
class AugmentConfig:
    """Augmentation probabilities and ranges. ``AugmentConfig.none()`` disables all.

    Ranges are ``(low, high)``, drawn uniformly unless said otherwise; pixel
    values are on the 0..255 scale, spatial sizes in model-input pixels.
    """

    flip: bool = True  # horizontal and vertical flips, each with probability 0.5
    rot90: bool = True  # rotation by k * 90 degrees, k uniform in 0..3
    gamma_range: tuple[float, float] = (0.7, 1.4)  # log-uniform
    contrast_range: tuple[float, float] = (0.75, 1.25)  # around the image mean
    brightness_range: tuple[float, float] = (-20.0, 20.0)  # added, 0..255 scale
    invert_prob: float = 0.1
    channel_shuffle_prob: float = 0.2
    blur_prob: float = 0.2
    blur_sigma_range: tuple[float, float] = (0.5, 1.5)
    noise_prob: float = 0.3
    noise_std_range: tuple[float, float] = (2.0, 12.0)  # 0..255 scale
    # ---- the families for generalisation (all off in the basic preset) ----
    #: zoom the view's content by a factor log-uniform in ``zoom_range`` (frame kept)
    zoom_prob: float = 0.0
    zoom_range: tuple[float, float] = (0.25, 4.0)
    #: brightfield look: dark objects on a bright, unevenly lit grey background
    brightfield_prob: float = 0.0
    brightfield_background_range: tuple[float, float] = (0.65, 0.95)  # 0..1 grey level
    brightfield_depth_range: tuple[float, float] = (0.25, 0.65)  # objects this much darker
    brightfield_illumination: float = 0.15  # +- relative linear illumination gradient
    #: H&E-like colour: hematoxylin-purple objects on eosin-pink / white (Beer-Lambert)
    he_prob: float = 0.0
    he_hematoxylin_range: tuple[float, float] = (0.6, 1.6)  # optical density at objects
    he_eosin_range: tuple[float, float] = (0.15, 0.5)  # optical density of the background
    he_stain_jitter: float = 0.05  # s.d. of the stain vectors' per-channel perturbation
    #: anisotropic blur: a Gaussian with independent sigmas along rows and columns
    aniso_blur_prob: float = 0.0
    aniso_blur_sigma_range: tuple[float, float] = (0.3, 2.5)
    #: anisotropic noise: Gaussian noise correlated over independent lengths along
    #: rows and columns (streaks of line-scanned and camera noise), then scaled to its s.d.
    aniso_noise_prob: float = 0.0
    aniso_noise_std_range: tuple[float, float] = (2.0, 16.0)  # 0..255 scale
    aniso_noise_corr_range: tuple[float, float] = (0.0, 2.0)  # Gaussian sigma per axis
    #: bit depth: the view as a 16-bit or float image, normalised back by to_rgb_uint8
    bit_depth_prob: float = 0.0
    bit_depth_levels_range: tuple[float, float] = (16.0, 65535.0)  # log-uniform grey levels
    bit_depth_float_prob: float = 0.5  # float32 instead of uint16
    bit_depth_outlier_prob: float = 0.25  # a few hot pixels stretch the range

    @classmethod
    def none(cls) -> AugmentConfig:
        """A configuration that leaves images and labels unchanged."""
        return cls(
            flip=False,
            rot90=False,
            gamma_range=(1.0, 1.0),
            contrast_range=(1.0, 1.0),
            brightness_range=(0.0, 0.0),
            invert_prob=0.0,
            channel_shuffle_prob=0.0,
            blur_prob=0.0,
            noise_prob=0.0,
        )

    @classmethod
    def general(cls) -> AugmentConfig:
        """The basic preset plus every family for generalisation (the ``"general"`` preset).

        Probabilities: zoom 0.5, brightfield 0.15, H&E 0.15 (exclusive with
        brightfield), anisotropic blur 0.2, anisotropic noise 0.25, bit depth 0.3.
        """
        return cls(zoom_prob=0.5, brightfield_prob=0.15, he_prob=0.15, aniso_blur_prob=0.2,
                   aniso_noise_prob=0.25, bit_depth_prob=0.3)

    @classmethod
    def preset(cls, name: str) -> AugmentConfig:
        """The named preset of :data:`PRESETS` (``"basic"`` is ``AugmentConfig()``).

        Raises:
          InvalidInputError: an unknown name.
        """
        if name == "basic":
            return cls()
        if name == "general":
            return cls.general()
        raise InvalidInputError(f"Unknown augmentation preset {name!r}; use one of "
                                f"{', '.join(PRESETS)}.")


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)


def _fires(rng: np.random.Generator, prob: float) -> bool:
    """True with probability ``prob``; draws nothing when ``prob`` is 0 (basic preset stable)."""
    return prob > 0 and rng.random() < prob


def nearest_indices(n_out: int, n_in: float, offset: int = 0) -> np.ndarray:
    """Indices of the source pixels under the centres of ``n_out`` output pixels."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, max(int(np.ceil(n_in)) - 1, 0)) + offset


def resize_pair(
    image: np.ndarray, labels: np.ndarray, hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) uint8 bilinear and ``labels`` (H, W) nearest to ``hw`` = (h, w).

    Labels keep the ids under the output pixels' centres, so both stay aligned.
    """
    h, w = hw
    ch, cw = labels.shape
    if (h, w) == (ch, cw):
        return image, labels
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), 2))
    return image, labels[nearest_indices(h, ch)][:, nearest_indices(w, cw)]


def augment_geometry(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Flip/rotate ``image`` (H, W, C) and ``labels`` (H, W) identically.

    Returns views when possible; the outputs may have (W, H) spatial shape.
    """
    if config.flip:
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:
            image, labels = image[::-1], labels[::-1]
    if config.rot90:
        k = int(rng.integers(0, 4))
        if k:
            image, labels = np.rot90(image, k), np.rot90(labels, k)
    return image, labels


def draw_zoom(rng: np.random.Generator, config: AugmentConfig) -> float:
    """The zoom of one view: 1 (no zoom) or log-uniform in ``config.zoom_range``."""
    return _log_uniform(rng, config.zoom_range) if _fires(rng, config.zoom_prob) else 1.0


def _mirror_index(n_out: int, period: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index and tile number of ``n_out`` pixels of a mirrored tiling of ``period``."""
    t = np.arange(n_out) + start
    tile, pos = np.divmod(t, period)
    return np.where(tile % 2 == 0, pos, period - 1 - pos), tile


def zoom_view(
    image: np.ndarray,
    labels: np.ndarray,
    hw: tuple[int, int],
    zoom: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The view ``image`` (H, W, 3) uint8 / ``labels`` (H, W) shown in an (h, w) frame, zoomed.

    Without zoom the view would be resized to ``hw``; here its content appears
    ``zoom`` times larger (objects ``zoom`` times wider), and the frame keeps its size:

    * ``zoom > 1``: a window of (H / zoom, W / zoom) source pixels at a random
      position (one holding an object when a few tries find it), resized to ``hw``;
    * ``zoom < 1``: the view is resized to (h * zoom, w * zoom) and tiled with
      mirrored copies from a random origin to fill ``hw``; every copy's objects
      get their own ids (id + copy number * max id), so no id is split in two.

    Labels are nearest-sampled like every resize of the dataset: an object
    keeps the output pixels whose centres fall in it, and one that no pixel
    centre hits is gone from the labels (it is then also below any area the
    trainer prompts). Returns ``(image (h, w, 3) uint8, labels (h, w))``.
    """
    h, w = hw
    H, W = labels.shape
    if zoom >= 1.0:
        wh, ww = max(1, min(H, round(H / zoom))), max(1, min(W, round(W / zoom)))
        for _ in range(5):
            r0 = int(rng.integers(0, H - wh + 1))
            c0 = int(rng.integers(0, W - ww + 1))
            if labels[r0 : r0 + wh, c0 : c0 + ww].any():
                break
        return resize_pair(image[r0 : r0 + wh, c0 : c0 + ww], labels[r0 : r0 + wh, c0 : c0 + ww],
                           (h, w))
    small_img, small_lab = resize_pair(image, labels,
                                       (max(1, round(h * zoom)), max(1, round(w * zoom))))
    sh, sw = small_lab.shape
    rows, tile_r = _mirror_index(h, sh, int(rng.integers(0, sh)))
    cols, tile_c = _mirror_index(w, sw, int(rng.integers(0, sw)))
    out_img = small_img[rows][:, cols]
    out_lab = small_lab[rows][:, cols].astype(np.int64)
    copy = tile_r[:, None] * (int(tile_c.max()) + 1) + tile_c[None, :]
    step = int(small_lab.max()) if small_lab.size else 0
    out_lab = np.where(out_lab > 0, out_lab + copy * step, 0)
    return np.ascontiguousarray(out_img), out_lab


def _grey_objects_bright(x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Grey (H, W) of ``x`` (H, W, 3) in 0..1, stretched to 0..1, objects bright.

    The objects' polarity comes from ``labels`` (their mean against the
    background's) or, without labels or without background, from the median:
    the background is taken to be the majority of pixels.
    """
    grey = x.mean(axis=-1)
    lo, hi = np.percentile(grey, (1.0, 99.0))
    grey = np.clip((grey - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(grey)
    fg = labels > 0 if labels is not None else None
    if fg is not None and fg.any() and (~fg).any():
        dark_objects = grey[fg].mean() < grey[~fg].mean()
    else:
        dark_objects = np.median(grey) > 0.5
    return 1.0 - grey if dark_objects else grey


def brightfield_look(
    x: np.ndarray, rng: np.random.Generator, config: AugmentConfig,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """A brightfield look of ``x`` (H, W, 3) in 0..1 -> same: dark objects, bright background.

    ``grey`` (objects 1, background 0) becomes ``background - depth * grey``,
    times a linear illumination gradient of random direction and strength
    up to ``brightfield_illumination``; grey in all three channels.
    """
    grey = _grey_objects_bright(x, labels)
    background = rng.uniform(*config.brightfield_background_range)
    depth = rng.uniform(*config.brightfield_depth_range)
    h, w = grey.shape
    angle = rng.uniform(0.0, 2 * np.pi)
    rr, cc = np.mgrid[:h, :w]
    ramp = (np.cos(angle) * (rr / max(h - 1, 1) - 0.5) + np.sin(angle) * (cc / max(w - 1, 1)
                                                                          - 0.5))
    light = 1.0 + rng.uniform(-1.0, 1.0) * config.brightfield_illumination * 2.0 * ramp
    out = (background - depth * grey) * light
    return np.repeat(np.clip(out, 0.0, 1.0)[..., None], 3, axis=-1)


def he_look(
    x: np.ndarray, rng: np.random.Generator, config: AugmentConfig,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """H&E-like colour of ``x`` (H, W, 3) in 0..1 -> same (stain mapping of its grey image).

    Beer-Lambert: the objects (grey 1) take hematoxylin (optical density in
    ``he_hematoxylin_range``), the background eosin (``he_eosin_range``,
    fading under the objects, with a smooth texture); transmitted light
    ``exp(-(h * H + e * E))`` per channel with stain vectors ``H`` (purple-blue)
    and ``E`` (pink), each perturbed by ``he_stain_jitter``.
    """
    from scipy.ndimage import gaussian_filter

    grey = _grey_objects_bright(x, labels)
    h_vec = np.clip(_HEMATOXYLIN_OD + rng.normal(0.0, config.he_stain_jitter, 3), 0.05, None)
    e_vec = np.clip(_EOSIN_OD + rng.normal(0.0, config.he_stain_jitter, 3), 0.05, None)
    hema = rng.uniform(*config.he_hematoxylin_range) * grey + 0.03
    texture = gaussian_filter(rng.normal(0.0, 1.0, grey.shape), 2.0)
    texture = texture / (texture.std() + 1e-6)
    eosin = rng.uniform(*config.he_eosin_range) * np.clip(1.0 - 0.6 * grey + 0.15 * texture,
                                                          0.0, None)
    od = hema[..., None] * h_vec + eosin[..., None] * e_vec
    return np.exp(-od)


def raw_user_image(
    pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """``pixels`` (H, W, 3) float in 0..255 as a user's 16-bit or float image would hold them.

    Grey views (three equal channels) become (H, W), colour ones stay
    (H, W, 3). uint16: ``offset + value * levels``, rounded, with ``levels``
    log-uniform in ``bit_depth_levels_range`` (few levels: a dim camera signal)
    and a random offset; float32 (probability ``bit_depth_float_prob``):
    ``offset + value * span`` with a span log-uniform in 1e-3..1e4. With
    probability ``bit_depth_outlier_prob`` about one pixel in 10,000 (at least
    one) is hot, 0.5-4 spans above the rest, which compresses the others after a
    min/max normalisation, as it does for real data.
    """
    x = np.asarray(pixels, dtype=np.float64) / 255.0
    if x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(
            x[..., 0], x[..., 2]):
        x = x[..., 0]
    as_float = rng.random() < config.bit_depth_float_prob
    if as_float:
        span = _log_uniform(rng, (1e-3, 1e4))
        offset = rng.uniform(-span, span)
    else:
        span = min(_log_uniform(rng, config.bit_depth_levels_range), 65535.0)
        offset = float(rng.integers(0, int(65535 - span) + 1))
    raw = offset + x * span
    if _fires(rng, config.bit_depth_outlier_prob):
        n = max(1, round(x.shape[0] * x.shape[1] * 1e-4))
        r = rng.integers(0, x.shape[0], n)
        c = rng.integers(0, x.shape[1], n)
        raw[r, c] = raw.max() + rng.uniform(0.5, 4.0) * span
    if as_float:
        return raw.astype(np.float32)
    return np.clip(np.rint(raw), 0, 65535).astype(np.uint16)


def augment_bit_depth(
    pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """``pixels`` (H, W, 3) float 0..255 through :func:`raw_user_image` and the product's
    :func:`~napari_sam.engine.image.to_rgb_uint8` -> (H, W, 3) float32 0..255."""
    from napari_sam.engine.image import to_rgb_uint8

    return to_rgb_uint8(raw_user_image(pixels, rng, config)).astype(np.float32)


def _aniso_sigmas(rng: np.random.Generator, bounds: tuple[float, float]) -> tuple[float, float]:
    return float(rng.uniform(*bounds)), float(rng.uniform(*bounds))


def augment_intensity(
    pixels: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Random intensity changes of ``pixels`` (H, W, 3) float32 in 0..255 -> same, clipped.

    ``labels`` (H, W), when given, tell the appearance families which pixels
    are objects (their polarity); see the module doc for the order.
    """
    from scipy.ndimage import gaussian_filter

    x = pixels / 255.0
    if config.brightfield_prob > 0 or config.he_prob > 0:
        u = rng.random()
        if u < config.brightfield_prob:
            x = brightfield_look(x, rng, config, labels)
        elif u < config.brightfield_prob + config.he_prob:
            x = he_look(x, rng, config, labels)
    lo, hi = config.gamma_range
    if hi > lo or lo != 1.0:
        gamma = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        x = np.power(np.clip(x, 0.0, 1.0), gamma)
    if rng.random() < config.invert_prob:
        x = 1.0 - x
    if rng.random() < config.channel_shuffle_prob:
        x = x[..., rng.permutation(x.shape[-1])]
    contrast = rng.uniform(*config.contrast_range)
    brightness = rng.uniform(*config.brightness_range) / 255.0
    x = (x - x.mean()) * contrast + x.mean() + brightness
    x = x * 255.0
    if rng.random() < config.blur_prob:
        sigma = rng.uniform(*config.blur_sigma_range)
        x = gaussian_filter(x, sigma=(sigma, sigma, 0))
    if rng.random() < config.noise_prob:
        std = rng.uniform(*config.noise_std_range)
        x = x + rng.normal(0.0, std, size=x.shape)
    if _fires(rng, config.aniso_blur_prob):
        sr, sc = _aniso_sigmas(rng, config.aniso_blur_sigma_range)
        x = gaussian_filter(x, sigma=(sr, sc, 0))
    if _fires(rng, config.aniso_noise_prob):
        std = rng.uniform(*config.aniso_noise_std_range)
        sr, sc = _aniso_sigmas(rng, config.aniso_noise_corr_range)
        noise = gaussian_filter(rng.normal(0.0, 1.0, size=x.shape[:2]), sigma=(sr, sc))
        x = x + (std / (noise.std() + 1e-12)) * noise[..., None]
    x = np.clip(x, 0.0, 255.0)
    if _fires(rng, config.bit_depth_prob):
        x = augment_bit_depth(x, rng, config)
    return x.astype(np.float32)
