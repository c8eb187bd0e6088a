"""Tests for engine.image.to_rgb_uint8, engine.transforms.ImageTransform and engine.cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_sam.engine.cache import CacheEntry, EmbeddingCache, image_key, model_key
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.transforms import ImageTransform
from napari_sam.errors import InvalidInputError

RNG = np.random.default_rng(0)


def _check_rgb(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.dtype == np.uint8
    assert out.shape == (*shape, 3)
    assert out.flags.c_contiguous


# ----------------------------------------------------------------------------- shapes


def test_grayscale_uint8_replicated_unchanged():
    img = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    out = to_rgb_uint8(img)
    _check_rgb(out, (5, 7))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], img)


def test_rgb_uint8_is_copied_not_aliased():
    img = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    out = to_rgb_uint8(img)
    np.testing.assert_array_equal(out, img)
    out[0, 0, 0] ^= 1
    assert out[0, 0, 0] != img[0, 0, 0]


def test_rgba_drops_alpha():
    img = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    out = to_rgb_uint8(img)
    _check_rgb(out, (4, 6))
    np.testing.assert_array_equal(out, img[..., :3])


def test_single_channel_last_axis_is_grayscale():
    img = RNG.integers(0, 256, (3, 4, 1), dtype=np.uint8)
    out = to_rgb_uint8(img)
    np.testing.assert_array_equal(out, np.repeat(img, 3, axis=2))


def test_channel_axis_first_is_moved():
    img = RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8)  # (C, H, W)
    out = to_rgb_uint8(img, channel_axis=0)
    _check_rgb(out, (5, 6))
    np.testing.assert_array_equal(out, np.moveaxis(img, 0, -1))
    np.testing.assert_array_equal(to_rgb_uint8(img, channel_axis=-3), out)


def test_two_channels_map_to_red_green():
    img = np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 200, np.uint8)])
    out = to_rgb_uint8(img, channel_axis=0)
    assert (out[..., 0] == 10).all() and (out[..., 1] == 200).all() and (out[..., 2] == 0).all()


def test_four_channels_with_channel_axis_take_first_three():
    img = RNG.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    out = to_rgb_uint8(img, channel_axis=0)
    np.testing.assert_array_equal(out, np.moveaxis(img[:3], 0, -1))


def test_too_many_channels_raise():
    with pytest.raises(InvalidInputError, match="at most 3"):
        to_rgb_uint8(np.zeros((5, 8, 8), np.uint8), channel_axis=0)


def test_3d_stack_without_channel_axis_raises_with_advice():
    with pytest.raises(InvalidInputError, match=r"2D slice.*channel_axis"):
        to_rgb_uint8(np.zeros((10, 32, 32), np.uint16))


def test_4d_raises():
    with pytest.raises(InvalidInputError, match="2D slice"):
        to_rgb_uint8(np.zeros((2, 3, 8, 8), np.uint8))


def test_1d_raises():
    with pytest.raises(InvalidInputError, match="Expected a 2D image"):
        to_rgb_uint8(np.zeros(8, np.uint8))


def test_channel_axis_needs_3d_and_valid_axis():
    with pytest.raises(InvalidInputError, match="needs a 3D array"):
        to_rgb_uint8(np.zeros((8, 8), np.uint8), channel_axis=0)
    with pytest.raises(InvalidInputError, match="out of range"):
        to_rgb_uint8(np.zeros((3, 8, 8), np.uint8), channel_axis=3)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0, 3)])
def test_empty_raises(shape):
    with pytest.raises(InvalidInputError, match="empty"):
        to_rgb_uint8(np.zeros(shape, np.uint8))


def test_one_pixel_image():
    out = to_rgb_uint8(np.array([[7]], np.uint8))
    _check_rgb(out, (1, 1))
    assert (out == 7).all()


# ----------------------------------------------------------------------------- dtypes


def test_bool_maps_to_0_255():
    img = np.array([[True, False], [False, True]])
    out = to_rgb_uint8(img)
    np.testing.assert_array_equal(out[..., 1], [[255, 0], [0, 255]])


def test_uint16_default_uses_data_range():
    img = np.array([[1000, 1500], [2000, 3000]], np.uint16)
    out = to_rgb_uint8(img)[..., 0]
    expected = np.rint((img.astype(float) - 1000) / 2000 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out.min() == 0 and out.max() == 255


def test_uint16_contrast_limits_clip():
    img = np.array([[0, 100, 200, 65535]], np.uint16)
    out = to_rgb_uint8(img, contrast_limits=(100, 200))[..., 2]
    np.testing.assert_array_equal(out, [[0, 0, 255, 255]])
    mid = to_rgb_uint8(np.array([[150]], np.uint16), contrast_limits=(100, 200))
    assert mid[0, 0, 0] == 128  # 127.5 rounds half to even -> 128


def test_uint8_contrast_limits_are_applied_and_identity_limits_are_exact():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(to_rgb_uint8(img, contrast_limits=(0, 255))[..., 0], img)
    stretched = to_rgb_uint8(img, contrast_limits=(0, 127.5))[..., 0]
    assert stretched[0, 1] == 2 and (stretched[8:] == 255).all()


def test_float_negative_range():
    img = np.array([[-1.0, 0.0], [0.5, 1.0]], np.float32)
    out = to_rgb_uint8(img)[..., 0]
    np.testing.assert_array_equal(out, [[0, 128], [191, 255]])


def test_float64_contrast_limits_outside_data():
    img = np.array([[-5.0, 5.0]])
    out = to_rgb_uint8(img, contrast_limits=(-10.0, 10.0))[..., 0]
    np.testing.assert_array_equal(out, [[64, 191]])


def test_int64_large_values_keep_precision():
    base = 2**40
    img = np.array([[base, base + 1, base + 2]], np.int64)
    np.testing.assert_array_equal(to_rgb_uint8(img)[..., 0], [[0, 128, 255]])


def test_rgb_uint16_keeps_colour_balance():
    img = np.zeros((2, 2, 3), np.uint16)
    img[..., 0] = 4000
    img[..., 1] = 2000
    out = to_rgb_uint8(img)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 128).all() and (out[..., 2] == 0).all()


def test_constant_image_is_zeros():
    assert (to_rgb_uint8(np.full((4, 4), 3.5)) == 0).all()
    assert (to_rgb_uint8(np.full((4, 4), 900, np.uint16)) == 0).all()


def test_degenerate_contrast_limits_are_a_step():
    img = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(to_rgb_uint8(img, contrast_limits=(2, 2))[..., 0], [[0, 0, 255]])


@pytest.mark.filterwarnings("error")  # numpy's overflow RuntimeWarnings were the only sign
def test_float64_range_at_the_ends_of_float64_is_not_all_zeros():
    # D10 / 1a row 18: a float64 image spanning -1e308..1e308 overflowed hi - lo and became
    # all zeros
    img = np.array([[-1e308, 0.0], [1e308, 5e307]])
    np.testing.assert_array_equal(to_rgb_uint8(img)[..., 0], [[0, 128], [255, 191]])
    big = np.finfo(np.float64).max
    out = to_rgb_uint8(img, contrast_limits=(-big, big))[..., 0]
    np.testing.assert_array_equal(out, [[57, 128], [198, 163]])
    np.testing.assert_array_equal(
        to_rgb_uint8(img, contrast_limits=(0.0, 1e308))[..., 0], [[0, 0], [255, 128]]
    )
    # a range so narrow that 255 / (hi - lo) overflows
    tiny = np.array([[0.0, 5e-324], [1.0, -1.0]])
    np.testing.assert_array_equal(to_rgb_uint8(tiny)[..., 0], [[128, 128], [255, 0]])
    np.testing.assert_array_equal(
        to_rgb_uint8(tiny, contrast_limits=(0.0, 5e-324))[..., 0], [[0, 255], [255, 0]]
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise_with_advice(bad):
    img = np.ones((4, 4), np.float32)
    img[1, 2] = bad
    with pytest.raises(InvalidInputError, match="nan_to_num"):
        to_rgb_uint8(img)


def test_complex_raises():
    with pytest.raises(InvalidInputError, match="Complex"):
        to_rgb_uint8(np.ones((4, 4), np.complex64))


@pytest.mark.parametrize("dtype", [object, "U3"])
def test_object_and_string_raise(dtype):
    with pytest.raises(InvalidInputError, match="Unsupported image dtype"):
        to_rgb_uint8(np.ones((4, 4)).astype(dtype))


@pytest.mark.parametrize("lims", [(5, 1), (0, np.nan), ("a", 1), (1,)])
def test_bad_contrast_limits_raise(lims):
    with pytest.raises(InvalidInputError, match="contrast_limits"):
        to_rgb_uint8(np.ones((4, 4)), contrast_limits=lims)


def test_input_not_modified_and_array_likes_accepted():
    img = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    before = img.copy()
    out = to_rgb_uint8(img.tolist())
    np.testing.assert_array_equal(img, before)
    np.testing.assert_array_equal(out, to_rgb_uint8(img))
    np.testing.assert_array_equal(to_rgb_uint8(torch.from_numpy(img)), out)


# ----------------------------------------------------------------------------- transform


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((1024, 1024), (1024, 1024)), ((300, 451), (681, 1024)), ((1500, 700), (1024, 478)),
     ((1, 1), (1024, 1024)), ((3, 2047), (2, 1024))],
)
def test_input_size_rounding(shape, expected):
    assert ImageTransform(1024).input_size(shape) == expected


def test_too_elongated_image_raises():
    with pytest.raises(InvalidInputError, match="too elongated"):
        ImageTransform(1024).input_size((1, 20000))
    with pytest.raises(InvalidInputError, match="too elongated"):
        ImageTransform(64).input_size((200, 1))


def test_resize_image_matches_pil_bilinear():
    from PIL import Image

    img = RNG.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    out = ImageTransform(64).resize_image(img)
    assert out.shape == (43, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((64, 43), 2)))
    same = RNG.integers(0, 256, (64, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ImageTransform(64).resize_image(same), same)


def test_resize_image_rejects_non_rgb_uint8():
    with pytest.raises(InvalidInputError, match="to_rgb_uint8"):
        ImageTransform(64).resize_image(np.zeros((8, 8), np.float32))


def test_points_and_boxes_to_model_frame():
    t = ImageTransform(100)
    pts = np.array([[10.0, 20.0], [0.0, 0.0]])  # (row, col) in a (50, 200) image
    np.testing.assert_allclose(t.points_to_model(pts, (50, 200)), [[10.0, 5.0], [0.0, 0.0]])
    box = np.array([2.0, 4.0, 40.0, 180.0])
    np.testing.assert_allclose(t.boxes_to_model(box, (50, 200)), [2.0, 1.0, 90.0, 20.0])
    boxes = np.stack([box, box])
    assert t.boxes_to_model(boxes, (50, 200)).shape == (2, 4)


# ----------------------------------------------------------------------------- cache


def _entry(n: int) -> CacheEntry:
    return CacheEntry(torch.zeros(n, dtype=torch.float32), (1, 1), (1, 1))


def test_image_key_depends_on_content_and_shape():
    a = np.zeros((4, 6, 3), np.uint8)
    assert image_key(a) == image_key(a.copy())
    assert image_key(a) != image_key(a.reshape(6, 4, 3))
    b = a.copy()
    b[3, 5, 2] = 1
    assert image_key(a) != image_key(b)


def test_model_key_is_per_object():
    m1, m2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert model_key(m1) == model_key(m1) != model_key(m2)


def test_cache_lru_eviction_by_bytes():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for i in range(3):
        cache.put(("m", str(i)), _entry(100))  # 400 bytes each
    assert len(cache) == 3 and cache.nbytes == 1200
    assert cache.get(("m", "0")) is not None  # 0 becomes most recent
    cache.put(("m", "3"), _entry(100))
    assert ("m", "1") not in cache and ("m", "0") in cache and ("m", "3") in cache
    cache.put(("m", "big"), _entry(1000))  # larger than the cache: not stored
    assert ("m", "big") not in cache and len(cache) == 3
    assert cache.get(("m", "nope")) is None
    assert cache.hits == 1 and cache.misses == 1
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_cache_replacing_a_key_keeps_byte_count():
    cache = EmbeddingCache(max_bytes=10_000)
    cache.put(("m", "a"), _entry(100))
    cache.put(("m", "a"), _entry(200))
    assert len(cache) == 1 and cache.nbytes == 800


def test_cache_is_thread_safe():
    cache = EmbeddingCache(max_bytes=50 * 400)

    def work(t: int) -> None:
        for i in range(200):
            cache.put(("m", f"{t}-{i % 70}"), _entry(100))
            cache.get(("m", f"{(t + 1) % 4}-{i % 70}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) == 50 and cache.nbytes == 50 * 400


def test_cache_rejects_negative_size():
    with pytest.raises(InvalidInputError):
        EmbeddingCache(max_bytes=-1)
