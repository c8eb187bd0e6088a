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


# ---------------------------------------------------------------------- batch: inputs


from napari_sam.engine import batch  # noqa: E402
from napari_sam.errors import ModelNotFoundError  # noqa: E402


def _write_png(path: Path, seed: int = 0, size: int = 64) -> np.ndarray:
    img = _blobs(size, size, seed)
    Image.fromarray(img).save(path)
    return img


def test_scan_inputs_files_folders_globs(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("b.png", "a.tif", "c.JPG"):
        (d / name).write_bytes(b"x")
    (d / "notes.txt").write_text("x")
    (d / ".hidden.png").write_bytes(b"x")
    (d / "sub").mkdir()
    (d / "sub" / "deep.png").write_bytes(b"x")
    other = tmp_path / "z.png"
    other.write_bytes(b"x")

    scan = batch.scan_inputs([d, str(d / "b.png"), str(tmp_path / "*.png"),
                              str(tmp_path / "nope.png"), str(tmp_path / "*.bmp")])
    names = [p.name for p in scan.paths]
    assert names == ["a.tif", "b.png", "c.JPG", "z.png"]  # sorted by full path, deduplicated
    assert all(p.is_absolute() for p in scan.paths)
    assert [p.name for p, _ in scan.ignored] == ["notes.txt"]
    assert [arg for arg, _ in scan.missing] == [str(tmp_path / "nope.png"), str(tmp_path / "*.bmp")]
    assert batch.discover_inputs([str(d / "**" / "*.png")]) == sorted(
        [(d / "b.png").resolve(), (d / "sub" / "deep.png").resolve()]
    )


def test_output_and_overlay_paths(tmp_path):
    assert batch.output_path("/x/cells.png", tmp_path) == tmp_path / "cells_labels.tif"
    assert batch.output_path("/x/cells.tif", tmp_path, "png") == tmp_path / "cells_labels.png"
    assert batch.output_path("/x/cells.tif", tmp_path, "coco") == tmp_path / "cells_coco.json"
    assert batch.overlay_path(tmp_path / "cells_labels.tif") == tmp_path / "cells_overlay.png"
    assert batch.overlay_path(tmp_path / "c_coco.json", stack=True) == tmp_path / "c_overlay.tif"
    with pytest.raises(InvalidInputError, match="Unknown output format"):
        batch.output_path("a.png", tmp_path, "jpg")


# ---------------------------------------------------------------------- batch: fake generator


class FakeGenerator:
    """Stands in for AutomaticMaskGenerator: bright pixels form one mask, the
    top-left 8x8 square another. ``fail_on`` = call numbers (1-based) that raise."""

    def __init__(self, fail_on=(), exc=RuntimeError):
        self.calls = 0
        self.fail_on = set(fail_on)
        self.exc = exc

    def generate(self, rgb, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.exc(f"simulated failure on call {self.calls}")
        bright = rgb[..., 0] > 100
        square = np.zeros(rgb.shape[:2], dtype=bool)
        square[:8, :8] = True
        out = []
        for seg, iou in ((square, 0.9), (bright, 0.95)):
            rows, cols = np.nonzero(seg)
            out.append({
                "segmentation": seg,
                "area": int(seg.sum()),
                "bbox": [int(cols.min()), int(rows.min()), int(np.ptp(cols)), int(np.ptp(rows))],
                "predicted_iou": iou,
                "stability_score": 0.97,
                "point_coords": [[1.0, 2.0]],
                "crop_box": [0, 0, rgb.shape[1], rgb.shape[0]],
            })
        return out


def expected_labels(rgb):
    """What everything_labels paints for FakeGenerator: larger mask first, ids by size."""
    bright = rgb[..., 0] > 100
    square = np.zeros(rgb.shape[:2], dtype=bool)
    square[:8, :8] = True
    big, small = (bright, square) if bright.sum() >= square.sum() else (square, bright)
    lab = np.zeros(rgb.shape[:2], dtype=np.uint32)
    lab[big] = 1
    lab[small] = 2
    return lab


@pytest.fixture
def fake_gen(monkeypatch):
    gen = FakeGenerator()
    monkeypatch.setattr(batch, "cached_model", lambda spec, device=None: object())
    monkeypatch.setattr(batch, "cached_generator", lambda spec, device, kwargs: gen)
    return gen


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    images = {f"img{i}.png": _write_png(d / f"img{i}.png", seed=i) for i in range(3)}
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
    (d / "readme.txt").write_text("not an image")
    return d, images


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_batch_writes_reports_and_skips_bad_files(fake_gen, folder, tmp_path):
    d, images = folder
    out = tmp_path / "out"
    seen = []
    report = batch.run_batch([d], out, "fake", {}, progress=lambda *a: seen.append(a))
    assert [p.name for p in report.done] == ["img0.png", "img1.png", "img2.png"]
    assert [p.name for p, _ in report.failed] == ["corrupt.png"]
    assert "corrupt.png: cannot read image" in report.failed[0][1]
    assert [p.name for p, _ in report.ignored] == ["readme.txt"]
    assert report.summary() == "3 done, 0 skipped, 1 failed (1 non-image file ignored)"
    assert not report.ok
    assert [(n, t, s) for n, t, _, s in seen] == [
        (1, 4, "failed"), (2, 4, "done"), (3, 4, "done"), (4, 4, "done")
    ]
    assert _listing(out) == ["img0_labels.tif", "img1_labels.tif", "img2_labels.tif"]
    for name, img in images.items():
        got = io.read_labels(out / name.replace(".png", "_labels.tif"))
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, expected_labels(img))


def test_batch_resume_skips_finished_and_overwrite_redoes(fake_gen, folder, tmp_path):
    d, _ = folder
    out = tmp_path / "out"
    batch.run_batch([d], out, "fake", {})
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = fake_gen.calls

    again = batch.run_batch([d], out, "fake", {})
    assert [p.name for p in again.skipped] == ["img0.png", "img1.png", "img2.png"]
    assert again.done == [] and len(again.failed) == 1  # the corrupt file is retried
    assert fake_gen.calls == calls
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first

    redo = batch.run_batch([d], out, "fake", {}, overwrite=True)
    assert len(redo.done) == 3 and redo.skipped == []
    assert fake_gen.calls == calls + 3

    # asking for overlays draws them from the existing labels: no new segmentation, and
    # the label images are not touched
    labels_before = {p.name: p.read_bytes() for p in out.iterdir()}
    with_overlay = batch.run_batch([d], out, "fake", {}, overlay=True)
    assert with_overlay.done == [] and len(with_overlay.skipped) == 3
    assert [p.name for p in with_overlay.overlays] == ["img0.png", "img1.png", "img2.png"]
    assert fake_gen.calls == calls + 3
    assert {name: (out / name).read_bytes() for name in labels_before} == labels_before
    img0 = np.asarray(Image.open(d / "img0.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "img0_overlay.png")),
                                  io.overlay_image(img0, io.read_labels(out / "img0_labels.tif")))


def test_batch_interrupted_keeps_finished_outputs(monkeypatch, folder, tmp_path):
    d, images = folder
    out = tmp_path / "out"
    gen = FakeGenerator(fail_on={2}, exc=KeyboardInterrupt)
    monkeypatch.setattr(batch, "cached_model", lambda spec, device=None: object())
    monkeypatch.setattr(batch, "cached_generator", lambda spec, device, kwargs: gen)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch([d / "img0.png", d / "img1.png", d / "img2.png"], out, "fake", {},
                        overlay=True)
    # the first image is complete, nothing of the second exists, no temp files
    assert _listing(out) == ["img0_labels.tif", "img0_overlay.png"]
    np.testing.assert_array_equal(io.read_labels(out / "img0_labels.tif"),
                                  expected_labels(images["img0.png"]))

    # the same command resumes: img0 skipped, the others done
    gen.fail_on = set()
    report = batch.run_batch([d / "img0.png", d / "img1.png", d / "img2.png"], out, "fake", {},
                             overlay=True)
    assert [p.name for p in report.skipped] == ["img0.png"]
    assert [p.name for p in report.done] == ["img1.png", "img2.png"]


def test_batch_error_in_one_image_goes_on(monkeypatch, folder, tmp_path):
    d, _ = folder
    gen = FakeGenerator(fail_on={2})
    monkeypatch.setattr(batch, "cached_model", lambda spec, device=None: object())
    monkeypatch.setattr(batch, "cached_generator", lambda spec, device, kwargs: gen)
    report = batch.run_batch([str(d / "img*.png")], tmp_path / "out", "fake", {})
    assert [p.name for p in report.done] == ["img0.png", "img2.png"]
    assert len(report.failed) == 1
    path, message = report.failed[0]
    assert path.name == "img1.png"
    assert "RuntimeError: simulated failure on call 2" in message
    assert _listing(tmp_path / "out") == ["img0_labels.tif", "img2_labels.tif"]


def test_batch_write_failure_leaves_no_temp_file(fake_gen, folder, tmp_path, monkeypatch):
    d, _ = folder

    def broken_imwrite(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    out = tmp_path / "out"
    report = batch.run_batch([d / "img0.png"], out, "fake", {})
    assert report.done == [] and "disk full" in report.failed[0][1]
    assert _listing(out) == []


def test_batch_stack_ids_unique_across_planes(fake_gen, tmp_path):
    planes = np.stack([_blobs(48, 48, s)[..., 0] for s in range(3)]).astype(np.uint16) * 10
    tifffile.imwrite(tmp_path / "stack.tif", planes, photometric="minisblack")
    report = batch.run_batch([tmp_path / "stack.tif"], tmp_path / "out", "fake", {},
                             overlay=True)
    assert report.ok
    labels = io.read_labels(tmp_path / "out" / "stack_labels.tif")
    assert labels.shape == (3, 48, 48)
    ids = [set(np.unique(labels[z]).tolist()) - {0} for z in range(3)]
    assert ids == [{1, 2}, {3, 4}, {5, 6}]
    assert (tmp_path / "out" / "stack_overlay.tif").exists()
    # PNG cannot hold a stack: reported, not crashed
    report = batch.run_batch([tmp_path / "stack.tif"], tmp_path / "out", "fake", {}, fmt="png")
    assert "Use --format tif" in report.failed[0][1]


def test_batch_coco_output(fake_gen, folder, tmp_path):
    from napari_sam.engine.masks import rle_to_mask

    d, images = folder
    out = tmp_path / "out"
    report = batch.run_batch([d / "img1.png"], out, "fake", {}, fmt="coco")
    assert report.ok
    doc = json.loads((out / "img1_coco.json").read_text())
    assert doc["images"] == [{"id": 1, "file_name": "img1.png", "height": 64, "width": 64}]
    assert len(doc["annotations"]) == 2
    lab = expected_labels(images["img1.png"])
    for ann in doc["annotations"]:
        mask = rle_to_mask(ann["segmentation"])
        assert ann["area"] == int(mask.sum())
        # the label id stored in the annotation is the one painted for this mask
        assert np.all(lab[mask & (lab == ann["label"])] == ann["label"])
        assert (lab == ann["label"]).sum() > 0


def test_batch_name_clash_and_outputs_beside_inputs(fake_gen, tmp_path):
    _write_png(tmp_path / "a.png", 1)
    tifffile.imwrite(tmp_path / "a.tif", _blobs(32, 32, 2))
    report = batch.run_batch([tmp_path], tmp_path, "fake", {})
    assert [p.name for p in report.done] == ["a.png"]
    assert "clashes with a.png" in report.failed[0][1]
    # outputs written into the input folder are not taken as inputs next time
    report = batch.run_batch([tmp_path / "a.png", tmp_path / "a_labels.tif"], tmp_path, "fake",
                             {})
    assert [p.name for p in report.skipped] == ["a.png"]
    assert report.ignored == []
    assert [p.name for p, _ in report.not_inputs] == ["a_labels.tif"]


def test_batch_missing_inputs_and_bad_model(tmp_path):
    report = batch.run_batch([tmp_path / "nope.png"], tmp_path / "out", None, {})
    assert report.done == [] and "no such file or folder" in report.failed[0][1]
    _write_png(tmp_path / "a.png")
    with pytest.raises(ModelNotFoundError):
        batch.run_batch([tmp_path / "a.png"], tmp_path / "out", tmp_path / "missing.safetensors",
                        {})
    assert not (tmp_path / "out").exists() or _listing(tmp_path / "out") == []


# ---------------------------------------------------------------------- batch: real tiny model


@pytest.fixture
def tiny_model_path(tiny_sam, tmp_path):
    from napari_sam.models.checkpoint import save_model

    return save_model(tiny_sam, tmp_path / "tiny.safetensors")


GEN_KW = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def test_batch_real_tiny_model_matches_generator(tiny_model_path, tmp_path):
    from napari_sam.engine.everything import AutomaticMaskGenerator, records_to_labels
    from napari_sam.models.zoo import load_model

    img = _write_png(tmp_path / "a.png", 3)
    report = batch.run_batch([tmp_path / "a.png"], tmp_path / "out", tiny_model_path, GEN_KW,
                             device="cpu", overlay=True)
    assert report.ok and len(report.done) == 1
    got = io.read_labels(tmp_path / "out" / "a_labels.tif")
    gen = AutomaticMaskGenerator(load_model(tiny_model_path, device="cpu"), **GEN_KW)
    want = records_to_labels(gen.generate(img), img.shape[:2])
    assert want.max() > 0  # the test would be vacuous on an empty result
    np.testing.assert_array_equal(got, want)
    assert (tmp_path / "out" / "a_overlay.png").exists()


@pytest.mark.slow
def test_batch_distributed_local_cluster(tiny_model_path, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        _write_png(d / f"im{i}.png", i)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        report = batch.run_batch([d], tmp_path / "out", tiny_model_path, GEN_KW,
                                 scheduler=cluster.scheduler_address, device="cpu",
                                 torch_threads=1)
        assert report.ok, report.failed
        assert sorted(p.name for p in report.done) == [f"im{i}.png" for i in range(4)]
        assert _listing(tmp_path / "out") == [f"im{i}_labels.tif" for i in range(4)]
        # the same model and images in process give the same labels
        local = batch.run_batch([d], tmp_path / "local", tiny_model_path, GEN_KW, device="cpu")
        for i in range(4):
            np.testing.assert_array_equal(
                io.read_labels(tmp_path / "out" / f"im{i}_labels.tif"),
                io.read_labels(tmp_path / "local" / f"im{i}_labels.tif"),
            )
        assert len(local.done) == 4
        # rerun on the cluster: everything is skipped, no task is submitted
        again = batch.run_batch([d], tmp_path / "out", tiny_model_path, GEN_KW,
                                scheduler=cluster.scheduler_address)
        assert len(again.skipped) == 4


def test_batch_cancel_between_images(fake_gen, folder, tmp_path):
    from napari_sam.errors import CancelledError

    d, _ = folder
    polls = []

    def cancel():
        polls.append(1)
        return fake_gen.calls >= 1  # stop after the first image

    with pytest.raises(CancelledError, match="finished outputs are kept"):
        batch.run_batch([str(d / "img*.png")], tmp_path / "out", "fake", {}, cancel=cancel)
    assert _listing(tmp_path / "out") == ["img0_labels.tif"]
    assert polls


def test_batch_tiled_matches_generate_tiled(tiny_model_path, tmp_path):
    from napari_sam.engine.everything import AutomaticMaskGenerator, records_to_labels
    from napari_sam.engine.tiles import generate_tiled
    from napari_sam.models.zoo import load_model

    img = _write_png(tmp_path / "big.png", 5, size=96)
    report = batch.run_batch([tmp_path / "big.png"], tmp_path / "out", tiny_model_path, GEN_KW,
                             device="cpu", tile_size=64, tile_overlap=16, fmt="coco")
    assert report.ok, report.failed
    gen = AutomaticMaskGenerator(load_model(tiny_model_path, device="cpu"), **GEN_KW)
    records = generate_tiled(gen, img, tile_size=64, overlap=16)
    assert len(records) > 0
    doc = json.loads((tmp_path / "out" / "big_coco.json").read_text())
    assert sorted(a["area"] for a in doc["annotations"]) == sorted(r["area"] for r in records)
    batch.run_batch([tmp_path / "big.png"], tmp_path / "out", tiny_model_path, GEN_KW,
                    device="cpu", tile_size=64, tile_overlap=16)
    np.testing.assert_array_equal(io.read_labels(tmp_path / "out" / "big_labels.tif"),
                                  records_to_labels(records, img.shape[:2]))
    with pytest.raises(InvalidInputError, match="tile_overlap"):
        batch.run_batch([tmp_path / "big.png"], tmp_path / "o2", tiny_model_path, GEN_KW,
                        tile_size=64, tile_overlap=64)


# ---------------------------------------------------------------------- issue 13: existing files


def test_atomic_write_without_replace_keeps_the_existing_file(tmp_path):
    target = tmp_path / "labels.tif"
    target.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        io.write_labels(target, np.ones((4, 4), np.uint32), replace=False)
    # created by someone else while we were writing: still not replaced
    with pytest.raises(FileExistsError), io.atomic_path(tmp_path / "late.json",
                                                        replace=False) as tmp:
        tmp.write_text("ours")
        (tmp_path / "late.json").write_text("theirs")
    assert target.read_bytes() == b"the user's file"
    assert (tmp_path / "late.json").read_text() == "theirs"
    assert _listing(tmp_path) == ["labels.tif", "late.json"]  # no temporary file left
    io.write_labels(tmp_path / "new.png", np.ones((4, 4), np.uint32), replace=False)
    assert io.read_labels(tmp_path / "new.png").sum() == 16


def test_written_by_napari_sam_tells_our_files_from_the_users(fake_gen, tmp_path):
    lab = np.zeros((8, 8), np.uint32)
    lab[2:5, 2:5] = 1
    rgb = np.zeros((8, 8, 3), np.uint8)
    ours = [io.write_labels(tmp_path / "a.tif", lab), io.write_labels(tmp_path / "a.png", lab),
            io.write_overlay(tmp_path / "o.png", rgb, lab),
            io.write_overlay(tmp_path / "o.tif", rgb[None], lab[None])]
    _write_png(tmp_path / "img.png")
    batch.run_batch([tmp_path / "img.png"], tmp_path / "coco", "fake", {}, fmt="coco")
    ours.append(tmp_path / "coco" / "img_coco.json")
    tifffile.imwrite(tmp_path / "user.tif", lab)
    Image.fromarray(lab.astype(np.uint16)).save(tmp_path / "user.png")
    (tmp_path / "user.json").write_text('{"info": {"description": "mine"}}')
    for path in ours:
        assert io.written_by_napari_sam(path), path
    for name in ("user.tif", "user.png", "user.json", "img.png", "missing.tif"):
        assert not io.written_by_napari_sam(tmp_path / name), name


def test_read_planar_rgb_tiff_says_so_and_can_read_planes(tmp_path):
    planes = np.stack([_blobs(30, 40, s)[..., 0] for s in range(3)])
    tifffile.imwrite(tmp_path / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    img = io.read_image(tmp_path / "planar.tif")
    assert img.rgb and img.plane_shape == (30, 40) and not img.is_stack
    assert "3 planes are stored as planar RGB" in img.notice
    as_planes = io.read_image(tmp_path / "planar.tif", channels_as_planes=True)
    assert not as_planes.rgb and as_planes.stack_shape == (3,) and as_planes.notice is None
    np.testing.assert_array_equal(as_planes.data, planes)
    # interleaved RGB (as cameras write it) is colour without a notice
    tifffile.imwrite(tmp_path / "rgb.tif", _blobs(30, 40))
    assert io.read_image(tmp_path / "rgb.tif").notice is None
    assert io.read_image(tmp_path / "rgb.tif", channels_as_planes=True).stack_shape == (3,)


def test_batch_never_replaces_files_it_did_not_write(fake_gen, tmp_path):
    """The training layout x.png + x_labels.tif, with --overlay and even --overwrite."""
    images = {name: _write_png(tmp_path / f"{name}.png", seed) for seed, name in
              enumerate(("x", "y"))}
    tifffile.imwrite(tmp_path / "x_labels.tif", np.ones((64, 64), np.uint32))  # ground truth
    gt = (tmp_path / "x_labels.tif").read_bytes()
    heard = []
    for overwrite in (False, True):
        report = batch.run_batch([tmp_path], tmp_path, "fake", {}, overlay=True,
                                 overwrite=overwrite, notify=lambda p, t: heard.append((p, t)))
        assert (tmp_path / "x_labels.tif").read_bytes() == gt
        assert [p.name for p in report.skipped] == ["x.png"]
        assert "x_labels.tif" in [p.name for p, _ in report.not_inputs]
        assert report.notes and heard[-len(report.notes):] == report.notes
    assert "never replaced, even with --overwrite" in report.notes[0][1]
    assert not (tmp_path / "x_overlay.png").exists()
    # y is ours: redone with --overwrite, its overlay replaced
    assert [p.name for p in report.done] == ["y.png"]
    np.testing.assert_array_equal(io.read_labels(tmp_path / "y_labels.tif"),
                                  expected_labels(images["y"]))


def test_batch_overlay_from_an_existing_coco_output(fake_gen, folder, tmp_path):
    d, images = folder
    out = tmp_path / "out"
    batch.run_batch([d / "img1.png"], out, "fake", {}, fmt="coco")
    coco = (out / "img1_coco.json").read_bytes()
    calls = fake_gen.calls
    report = batch.run_batch([d / "img1.png"], out, "fake", {}, fmt="coco", overlay=True)
    assert [p.name for p in report.overlays] == ["img1.png"] and fake_gen.calls == calls
    assert (out / "img1_coco.json").read_bytes() == coco
    want = io.overlay_image(images["img1.png"], expected_labels(images["img1.png"]))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "img1_overlay.png")), want)


def test_process_wide_caches_are_named_and_can_be_cleared(monkeypatch, tiny_sam):
    """Architecture review (b) 'next in line': get_model/get_generator never evicted models."""
    monkeypatch.setattr(batch, "_MODELS", {("tiny", None): tiny_sam})
    monkeypatch.setattr(batch, "_GENERATORS", {})
    assert batch.cached_model("tiny") is tiny_sam
    gen = batch.cached_generator("tiny", None, {"points_per_side": 2})
    assert batch.cached_generator("tiny", None, {"points_per_side": 2}) is gen
    assert batch.get_model is batch.cached_model and batch.get_generator is batch.cached_generator
    batch.clear_caches()
    assert batch._MODELS == {} and batch._GENERATORS == {}
