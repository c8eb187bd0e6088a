"""The augmentation families of napari_sam.training.augment on hand-made images (issue 15)."""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_sam.engine.image import to_rgb_uint8
from napari_sam.errors import InvalidInputError
from napari_sam.training.augment import (
    AugmentConfig,
    augment_bit_depth,
    augment_intensity,
    brightfield_look,
    he_look,
    raw_user_image,
    zoom_view,
)
from napari_sam.training.datasets import InstanceDataset

#: every family off: the changes tested one at a time start from here
NONE = AugmentConfig.none()


def _disks(size: int = 64, bright: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) float 0..255 grey image with 3 disks and their (size, size) labels."""
    rr, cc = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int64)
    for k, (r, c) in enumerate(((16, 16), (40, 44), (20, 48)), start=1):
        labels[(rr - r) ** 2 + (cc - c) ** 2 < 49] = k
    grey = np.where(labels > 0, 200.0, 40.0) if bright else np.where(labels > 0, 60.0, 220.0)
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32), labels


def _hue_degrees(rgb: np.ndarray) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(float(v) for v in rgb))[0]


@pytest.mark.parametrize("bright", [True, False])
def test_brightfield_look_shows_dark_objects_on_a_bright_background(bright):
    pixels, labels = _disks(bright=bright)  # fluorescence-like, or already brightfield-like
    config = dataclasses.replace(NONE, brightfield_prob=1.0)
    for seed in range(5):
        out = augment_intensity(pixels, np.random.default_rng(seed), config, labels=labels)
        fg, bg = out[labels > 0].mean(), out[labels == 0].mean()
        assert bg > 255 * 0.5 and fg < bg - 255 * 0.2, (seed, fg, bg)
        assert np.array_equal(out[..., 0], out[..., 1])  # grey, like a brightfield camera
    # without labels the majority of pixels is taken for the background
    out = brightfield_look(pixels / 255.0, np.random.default_rng(0), config)
    assert out[labels > 0].mean() < out[labels == 0].mean()


def test_he_look_gives_purple_objects_on_pink_background():
    pixels, labels = _disks()
    config = dataclasses.replace(NONE, he_prob=1.0)
    for seed in range(5):
        out = augment_intensity(pixels, np.random.default_rng(seed), config, labels=labels)
        fg = out[labels > 0].mean(axis=0) / 255.0
        bg = np.median(out[labels == 0], axis=0) / 255.0
        assert 230.0 <= _hue_degrees(fg) <= 300.0, (seed, fg)  # hematoxylin blue-purple
        hue_bg = _hue_degrees(bg)
        assert hue_bg >= 300.0 or hue_bg <= 20.0, (seed, bg)  # eosin pink
        assert bg[0] > bg[2] > bg[1] and bg.mean() > fg.mean()  # pink, lighter than nuclei
    # dark objects (a brightfield image) are found by the labels and stained the same way
    dark, _ = _disks(bright=False)
    out = he_look(dark / 255.0, np.random.default_rng(0), config, labels)
    assert 230.0 <= _hue_degrees(out[labels > 0].mean(axis=0)) <= 300.0


def _id_coded(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Square objects whose grey value encodes their id (value 40 * id), on black."""
    labels = np.zeros((size, size), np.int64)
    for k, (r, c) in enumerate(((8, 10), (50, 20), (30, 60), (70, 70)), start=1):
        labels[r : r + 20, c : c + 20] = k
    image = np.repeat((labels * 40).astype(np.uint8)[..., None], 3, axis=-1)
    return image, labels


def _write_id_coded(root: Path, size: int) -> Path:
    """A dataset folder (images/ + labels/) holding one :func:`_id_coded` image."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image, labels = _id_coded(size)
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(labels.astype(np.uint16)).save(root / "labels" / "a.png")
    return root


@pytest.mark.parametrize("zoom", [0.25, 0.5, 0.8, 1.7, 4.0])
def test_zoom_keeps_the_frame_and_the_labels_on_their_objects(zoom):
    image, labels = _id_coded()
    for seed in range(4):
        out_img, out_lab = zoom_view(image, labels, (64, 48), zoom, np.random.default_rng(seed))
        assert out_img.shape == (64, 48, 3) and out_lab.shape == (64, 48)
        ids = np.unique(out_lab[out_lab > 0])
        step = int(labels.max())
        for i in ids:
            source = (i - 1) % step + 1  # the object a mirrored copy came from
            inside = out_img[..., 0][out_lab == i]
            value = 40 * source
            if inside.size >= 16:  # its own value, and mostly near it (borders are blended)
                assert abs(int(inside.max()) - value) <= 2, (zoom, seed, i)
                assert np.median(inside) >= 0.5 * value, (zoom, seed, i)
            else:  # a tiny object: blended with the background, still brightest where labelled
                assert inside.max() >= 0.5 * value, (zoom, seed, i, inside)
        assert (out_img[..., 0][out_lab == 0] < 40).mean() > 0.9  # background stays background
        if zoom < 1:  # a mosaic: each copy of an object has its own id
            from scipy.ndimage import label as components

            for i in ids:
                assert components(out_lab == i)[1] == 1, (zoom, seed, i)

def test_zoom_makes_objects_zoom_times_as_wide():
    image, labels = _id_coded()

    def largest(zoom: float) -> int:  # the largest object area over a few views
        views = [zoom_view(image, labels, (64, 48), zoom, np.random.default_rng(s))[1]
                 for s in range(6)]
        return max(np.unique(v[v > 0], return_counts=True)[1].max() for v in views)

    plain = largest(1.0)  # a 20 x 20 object resized to 64 / 96 x 48 / 96: 13 x 10 pixels
    assert 110 <= plain <= 150
    assert 3.5 * plain <= largest(2.0) <= 4.5 * plain
    assert 0.15 * plain <= largest(0.5) <= 0.35 * plain


def test_zoomed_samples_keep_labels_on_bright_objects_and_the_model_frame(tmp_path):
    root = _write_id_coded(tmp_path / "ds", size=120)
    zoom_only = dataclasses.replace(NONE, zoom_prob=1.0)
    ds = InstanceDataset(root, img_size=64, low_res_size=16, augment=zoom_only)
    sizes = set()
    for seed in range(8):
        s = ds.sample(0, np.random.default_rng(seed))
        assert s.image.shape == (3, 64, 64) and s.labels_low.shape == (16, 16)
        fg = s.labels > 0
        valid = torch.zeros_like(fg)
        valid[: s.input_size[0], : s.input_size[1]] = True
        if fg.any():
            assert s.image[0][fg].mean() > s.image[0][~fg & valid].mean() + 0.3
        sizes.add(int(fg.sum()))
    assert len(sizes) > 3  # the zoom changed what the views hold


def test_bit_depth_round_trips_through_the_product_normalisation():
    ramp = np.repeat(np.tile(np.arange(256, dtype=np.float32), (8, 1))[..., None], 3, -1)
    for as_float in (0.0, 1.0):
        config = dataclasses.replace(NONE, bit_depth_prob=1.0, bit_depth_float_prob=as_float,
                                     bit_depth_outlier_prob=0.0,
                                     bit_depth_levels_range=(4096.0, 4096.0))
        raw = raw_user_image(ramp, np.random.default_rng(1), config)
        assert raw.shape == (8, 256)  # a grey view becomes a single-channel image
        assert raw.dtype == (np.float32 if as_float else np.uint16)
        back = augment_bit_depth(ramp, np.random.default_rng(1), config)
        np.testing.assert_array_equal(back, to_rgb_uint8(raw).astype(np.float32))
        assert np.abs(back - ramp).max() <= 1.0
    # a colour view stays colour; few grey levels quantise; a hot pixel compresses the rest
    colour = ramp.copy()
    colour[..., 2] = 255 - colour[..., 2]
    config = dataclasses.replace(NONE, bit_depth_prob=1.0, bit_depth_float_prob=0.0,
                                 bit_depth_outlier_prob=0.0, bit_depth_levels_range=(16.0, 16.0))
    assert raw_user_image(colour, np.random.default_rng(0), config).shape == (8, 256, 3)
    assert len(np.unique(augment_bit_depth(ramp, np.random.default_rng(0), config))) == 17
    hot = dataclasses.replace(config, bit_depth_outlier_prob=1.0,
                              bit_depth_levels_range=(4096.0, 4096.0))
    out = augment_intensity(ramp, np.random.default_rng(0), hot)
    assert out.max() == 255 and np.median(out) < 0.7 * np.median(ramp)


def test_anisotropic_blur_and_noise():
    dot = np.zeros((41, 41, 3), np.float32)
    dot[20, 20] = 255.0
    config = dataclasses.replace(NONE, aniso_blur_prob=1.0, aniso_blur_sigma_range=(0.5, 3.0))
    ratios = []
    rr, cc = np.mgrid[:41, :41] - 20
    for seed in range(6):
        w = augment_intensity(dot, np.random.default_rng(seed), config)[..., 0].astype(np.float64)
        w /= w.sum()
        var_r, var_c = (w * rr**2).sum(), (w * cc**2).sum()
        assert 0.2 < var_r < 9.5 and 0.2 < var_c < 9.5
        ratios.append(var_r / var_c)
    assert max(ratios) > 1.5 or min(ratios) < 1 / 1.5  # rows and columns blurred differently

    flat = np.full((96, 96, 3), 128.0, np.float32)
    config = dataclasses.replace(NONE, aniso_noise_prob=1.0, aniso_noise_std_range=(8.0, 8.0),
                                 aniso_noise_corr_range=(0.0, 3.0))
    lags = []
    for seed in range(6):
        noise = augment_intensity(flat, np.random.default_rng(seed), config) - 128.0
        assert np.array_equal(noise[..., 0], noise[..., 2])  # one sensor: grey stays grey
        assert 6.5 < noise.std() < 9.5
        n = noise[..., 0]
        lag_r = np.corrcoef(n[1:].ravel(), n[:-1].ravel())[0, 1]
        lag_c = np.corrcoef(n[:, 1:].ravel(), n[:, :-1].ravel())[0, 1]
        lags.append(lag_r - lag_c)
    assert max(np.abs(lags)) > 0.2  # correlated along one axis more than the other


def test_general_samples_are_seeded_and_zero_probabilities_are_the_identity(tmp_path):
    root = _write_id_coded(tmp_path / "ds", size=80)
    general = InstanceDataset(root, img_size=64, augment=AugmentConfig.preset("general"))
    a, b = (general.sample(0, np.random.default_rng(3)) for _ in range(2))
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
    differ = [not torch.equal(a.image, general.sample(0, np.random.default_rng(s)).image)
              for s in range(4, 8)]
    assert all(differ)
    # every family at probability 0: an augmented sample is the plain view
    off = InstanceDataset(root, img_size=64, augment=NONE)
    for seed in range(4):
        s = off.sample(0, np.random.default_rng(seed), augment=True, crop=False)
        assert torch.allclose(s.image, off[0].image, atol=1e-5)
        assert torch.equal(s.labels, off[0].labels)
    pixels, mask = _disks()
    np.testing.assert_allclose(augment_intensity(pixels, np.random.default_rng(0), NONE, mask),
                               pixels, atol=1e-3)


def test_presets():
    basic, general = AugmentConfig.preset("basic"), AugmentConfig.preset("general")
    assert basic == AugmentConfig()  # the augmentation of every earlier run
    families = ("zoom_prob", "brightfield_prob", "he_prob", "aniso_blur_prob",
                "aniso_noise_prob", "bit_depth_prob")
    assert all(getattr(basic, f) == 0 for f in families)
    assert all(getattr(general, f) > 0 for f in families)
    assert general.brightfield_prob + general.he_prob <= 1
    with pytest.raises(InvalidInputError, match="Unknown augmentation preset 'fancy'"):
        AugmentConfig.preset("fancy")
