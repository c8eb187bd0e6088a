"""Seeded data augmentation for (image, instance labels) pairs (numpy).

Geometry (flips, 90 degree rotations) is applied to the image and the labels
together, before resizing to the model input. Intensity changes (gamma,
contrast, brightness, inversion, channel shuffle, blur, Gaussian noise) apply
to the image only, on float32 RGB values in 0..255, after resizing. Random
crops at random scales are drawn by
:meth:`napari_sam.training.datasets.InstanceDataset.sample`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["AugmentConfig", "augment_geometry", "augment_intensity"]


@dataclasses.dataclass
class AugmentConfig:
    """Augmentation probabilities and ranges. ``AugmentConfig.none()`` disables all."""

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


def augment_intensity(
    pixels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """Random intensity changes of ``pixels`` (H, W, 3) float32 in 0..255 -> same, clipped."""
    x = pixels / 255.0
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
        from scipy.ndimage import gaussian_filter

        sigma = rng.uniform(*config.blur_sigma_range)
        x = gaussian_filter(x, sigma=(sigma, sigma, 0))
    if rng.random() < config.noise_prob:
        std = rng.uniform(*config.noise_std_range)
        x = x + rng.normal(0.0, std, size=x.shape)
    return np.clip(x, 0.0, 255.0).astype(np.float32)
