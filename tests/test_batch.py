"""Tests for engine/io.py (reading, atomic writing) and engine/batch.py (batch runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sam.engine import io
from napari_sam.errors import InvalidInputError

# ---------------------------------------------------------------------- io: images


def _blobs(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 image with a few bright discs on a dark background."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 20, dtype=np.uint8)
    for _ in range(3):
        r, c = rng.integers(10, h - 10), rng.integers(10, w - 10)
        img[(rr - r) ** 2 + (cc - c) ** 2 < 36] = rng.integers(150, 255, size=3)
    return img


def test_read_png_gray_rgb_rgba_16bit(tmp_path):
    gray = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    rgb = _blobs()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])).save(tmp_path / "a.png")

    g = io.read_image(tmp_path / "g16.png")
    assert g.data.dtype == np.uint16 and not g.rgb and g.plane_shape == (64, 48)
    np.testing.assert_array_equal(g.data, gray)
    c = io.read_image(tmp_path / "rgb.png")
    assert c.rgb and not c.is_stack and c.stack_shape == ()
    np.testing.assert_array_equal(c.data, rgb)
    a = io.read_image(tmp_path / "a.png")
    assert a.rgb and a.data.shape == (64, 64, 4)


def test_read_tiff_stack_and_rgb(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, size=(3, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    s = io.read_image(tmp_path / "s.tif")
    assert s.is_stack and s.stack_shape == (3,) and s.plane_shape == (20, 30) and not s.rgb
    assert [idx for idx, _ in s.planes()] == [(0,), (1,), (2,)]
    # planes of a stack share one intensity range
    lo, hi = s.contrast_limits()
    assert (lo, hi) == (stack.min(), stack.max())
    dim = s.plane_rgb(stack[0] // 2)
    assert dim.max() < 255

    rgb = _blobs(24, 30)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    r = io.read_image(tmp_path / "rgb.tif")
    assert r.rgb and not r.is_stack and r.plane_shape == (24, 30)

    rgb_stack = np.stack([rgb, rgb])
    tifffile.imwrite(tmp_path / "rgbs.tif", rgb_stack, photometric="rgb")
    rs = io.read_image(tmp_path / "rgbs.tif")
    assert rs.rgb and rs.stack_shape == (2,) and rs.plane_shape == (24, 30)


def test_read_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match="bad.png: cannot read image"):
        io.read_image(tmp_path / "bad.png")
    with pytest.raises(InvalidInputError, match="unsupported file type"):
        io.read_image(tmp_path / "notes.txt")
    with pytest.raises(InvalidInputError, match="no such file"):
        io.read_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------- io: writing


def test_write_labels_roundtrip(tmp_path):
    labels = np.zeros((2, 10, 12), dtype=np.uint32)
    labels[0, 2:5, 3:7] = 1
    labels[1, 5:9, 1:4] = 70000
    io.write_labels(tmp_path / "l.tif", labels)
    back = io.read_labels(tmp_path / "l.tif")
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)

    io.write_labels(tmp_path / "l.png", labels[0])
    back = io.read_labels(tmp_path / "l.png")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels[0])

    with pytest.raises(InvalidInputError, match="16-bit PNG"):
        io.write_labels(tmp_path / "big.png", labels[1])
    with pytest.raises(InvalidInputError, match="stacks"):
        io.write_labels(tmp_path / "stack.png", labels)
    with pytest.raises(InvalidInputError, match="integer"):
        io.write_labels(tmp_path / "f.tif", labels.astype(float))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "l.tif"]


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_overlay_draws_boundaries_in_label_colours(tmp_path):
    img = np.zeros((12, 12, 3), dtype=np.uint8)
    labels = np.zeros((12, 12), dtype=np.uint32)
    labels[2:8, 2:8] = 1
    labels[8:11, 8:11] = 2
    out = io.overlay_image(img, labels)
    colours = io.label_colors(np.array([1, 2]))
    assert not np.array_equal(colours[0], colours[1])
    np.testing.assert_array_equal(out[2, 4], colours[0])  # top edge of object 1
    np.testing.assert_array_equal(out[4, 4], 0)  # interior untouched
    np.testing.assert_array_equal(out[0, 0], 0)  # background untouched
    np.testing.assert_array_equal(out[9, 10], colours[1])
    io.write_overlay(tmp_path / "o.png", img, labels)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), out)


# ---------------------------------------------------------------------- io: prompt files


def test_read_prompts_csv(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text(
        "object,row,col,label,row0,col0,row1,col1\n"
        "# a comment\n"
        "cell1,10,12,1,,,,\n"
        "cell2,,,,5,6,20,30\n"
        "cell1,14,12.5,0,,,,\n"
        "\n"
        "cell2,8,9,,,,,\n"
    )
    objs = io.read_prompts(f)
    assert [o.name for o in objs] == ["cell1", "cell2"]
    np.testing.assert_array_equal(objs[0].points, [[10, 12], [14, 12.5]])
    np.testing.assert_array_equal(objs[0].labels, [1, 0])
    assert objs[0].box is None
    np.testing.assert_array_equal(objs[1].box, [5, 6, 20, 30])
    np.testing.assert_array_equal(objs[1].points, [[8, 9]])
    np.testing.assert_array_equal(objs[1].labels, [1])

    # without an object column every row is an object
    f.write_text("row,col\n1,2\n3,4\n")
    assert [o.name for o in io.read_prompts(f)] == ["1", "2"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("object,x,y\na,1,2\n", "unknown column"),
        ("object,row,col\na,1,\n", "line 2: a point needs both"),
        ("object,row,col,label\na,1,2,7\n", "line 2: label must be 1"),
        ("object,row0,col0,row1,col1\na,1,2,3,4\na,1,2,3,5\n", "line 3: .*one box per object"),
        ("object,row,col\na,1,abc\n", "col must be a number"),
        ("object,label\na,1\n", "needs point columns"),
    ],
)
def test_read_prompts_csv_errors(tmp_path, text, match):
    f = tmp_path / "p.csv"
    f.write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        io.read_prompts(f)


def test_read_prompts_json_and_check(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([
        {"points": [[3, 4], [5, 6]], "labels": [1, 0]},
        {"box": [1, 1, 9, 9]},
        {"points": [[2, 2]], "box": [0, 0, 5, 5], "name": "c"},
    ]))
    objs = io.read_prompts(f)
    assert [o.name for o in objs] == ["1", "2", "c"]
    np.testing.assert_array_equal(objs[0].labels, [1, 0])
    assert objs[1].points.shape == (0, 2) and objs[1].box is not None
    io.check_prompts(objs, (10, 10))
    with pytest.raises(InvalidInputError, match=r"object 1: point \(row 5, col 6\) is outside"):
        io.check_prompts(objs, (10, 6))
    far = io.PromptObject("c", np.zeros((0, 2)), np.zeros(0, int), np.array([20.0, 20, 30, 30]))
    with pytest.raises(InvalidInputError, match=r"object 3 \('c'\): box .* does not overlap"):
        io.check_prompts([objs[0], objs[1], far], (10, 10))

    f.write_text(json.dumps([{"points": [[1, 2]], "labels": [1, 1]}]))
    with pytest.raises(InvalidInputError, match="object 1: labels must be a list with one entry"):
        io.read_prompts(f)
    f.write_text(json.dumps([{}]))
    with pytest.raises(InvalidInputError, match="at least one point or a box"):
        io.read_prompts(f)


def test_temp_files_are_hidden(tmp_path):
    with io.atomic_path(tmp_path / "x.tif") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.tif.")
        tmp.write_bytes(b"data")
    assert (tmp_path / "x.tif").read_bytes() == b"data"
    assert Path(tmp).exists() is False
