#!/usr/bin/env python
"""Re-run the reproductions of the usability and reliability reviews on this checkout.

The reviews (December 2026, main at 01eb4d9) tried the plugin as careless and hostile
users would. This script repeats every reproduction of theirs that needs no GUI: the
command line in temporary folders (real processes, exit codes, files replaced or not,
SIGTERM on a batch), the Python API with bad input, crafted checkpoints and a damaged
model cache. Each check is named after the review finding it repeats (``D1``.. are the
reliability review's defects, ``R<section>.<row>`` its table rows, ``U<n>`` the
usability review's findings) and prints PASS or FAIL with what happened: the exception
type and its first line, an exit code, or which files changed. The widget findings
(keyboard, layers, UI-thread stalls) need a viewer; their tests are listed in
docs/review_findings.md.

Uses the embedded default model and tiny images; no network. Exit code 0 when every
check passes, 1 otherwise.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/review_repro.py [-k SUBSTRING] [-v]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# the command line as a user runs it, from this checkout's package
CLI = [sys.executable, "-c", "import sys; from napari_sam.cli import main; sys.exit(main())"]
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "OMP_NUM_THREADS": "1"}
FAST = ["--points-per-side", "8"]  # everything-mode settings that keep each run short
TRAIN_FAST = ["--batch-size", "1", "--instances-per-image", "1", "--rounds", "1",
              "--warmup-steps", "0", "--num-threads", "1", "--no-augment"]


class Failed(Exception):
    """A check saw the defect (or something else unexpected)."""


@dataclasses.dataclass
class Check:
    name: str
    run: Callable[[Path], str]  # takes an empty folder, returns what happened


CHECKS: list[Check] = []


def check(name: str) -> Callable[[Callable[[Path], str]], Callable[[Path], str]]:
    def register(fn: Callable[[Path], str]) -> Callable[[Path], str]:
        CHECKS.append(Check(name, fn))
        return fn
    return register


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:160]}{'...' if len(line) > 160 else ''}"


def raises(call: Callable[[], object], expected: type[BaseException] | tuple,
           contains: str = "") -> str:
    """``call()`` must raise ``expected`` with a one-line message holding ``contains``."""
    try:
        result = call()
    except expected as exc:
        msg = str(exc)
        expect("\n" not in msg.strip(), f"a multi-line message: {first_line(exc)}")
        expect(contains in msg, f"message lacks {contains!r}: {first_line(exc)}")
        return first_line(exc)
    except Exception as exc:  # the wrong kind of error is the defect the reviews saw
        raise Failed(f"wrong type, {first_line(exc)}") from exc
    raise Failed(f"no error; returned {_brief(result)}")


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def cli(*args: object, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else "(nothing)"


def wait_while_running(proc: subprocess.Popen, condition: Callable[[], bool], what: str,
                       timeout: float = 300) -> None:
    """Poll until ``condition()`` holds; fail if ``proc`` ends or ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        expect(proc.poll() is None, f"the process ended (rc {proc.returncode}) before {what}")
        expect(time.monotonic() < deadline, f"no {what} within {timeout:.0f} s")
        time.sleep(0.02)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disks(shape: tuple[int, int] = (96, 96), seed: int = 0,
          count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image of bright disks on a dark, noisy background (like nuclei) and its
    instance labels (uint16, 0 = background)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = rng.normal(25, 5, shape)
    labels = np.zeros(shape, np.uint16)
    margin = min(shape) // 6
    for k in range(1, count + 1):
        r, c = rng.uniform(margin, shape[0] - margin), rng.uniform(margin, shape[1] - margin)
        disk = (yy - r) ** 2 + (xx - c) ** 2 < rng.uniform(25, 80)
        img[disk], labels[disk] = rng.uniform(140, 220), k
    return np.clip(img, 0, 255).astype(np.uint8), labels


def blobs(shape: tuple[int, int] = (96, 96), seed: int = 0) -> np.ndarray:
    return disks(shape, seed)[0]


def save_png(path: Path, seed: int = 0, shape: tuple[int, int] = (96, 96)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blobs(shape, seed)).save(path)
    return path


def user_labels(path: Path, shape: tuple[int, int] = (96, 96)) -> Path:
    """Ground truth as a user saves it (tifffile, no napari-sam tag)."""
    import tifffile

    lab = np.zeros(shape, np.uint32)
    lab[10:40, 10:40], lab[60:90, 50:90] = 1, 2
    tifffile.imwrite(path, lab)
    return path


def dataset(root: Path, n: int = 2) -> Path:
    """images/ + labels/ of disks, the layout train and evaluate read."""
    from PIL import Image

    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        image, labels = disks((64, 64), seed=100 + i, count=3)
        Image.fromarray(image).save(root / "images" / f"a{i}.png")
        Image.fromarray(labels).save(root / "labels" / f"a{i}.png")
    return root


_MODEL = None


def model():
    global _MODEL
    if _MODEL is None:
        from napari_sam import load_model

        _MODEL = load_model(device="cpu")
    return _MODEL


def predictor_on(image: np.ndarray):
    from napari_sam import Predictor

    pred = Predictor(model())
    pred.set_image(image)
    return pred


def generator(**kwargs):
    from napari_sam import AutomaticMaskGenerator
    from napari_sam.models.zoo import recommended_everything_settings

    return AutomaticMaskGenerator(model(), **{**recommended_everything_settings(None), **kwargs})


# ---------------------------------------------------------------- files replaced (data loss)

@check("D1 / R3.11: everything --overlay keeps the user's x_labels.tif (ground truth)")
def _(tmp: Path) -> str:
    gt = tmp / "gt"
    save_png(gt / "x.png")
    labels = user_labels(gt / "x_labels.tif")
    before = digest(labels)
    first = cli("everything", gt, "--out", gt, *FAST, cwd=tmp)
    second = cli("everything", gt, "--out", gt, "--overlay", *FAST, cwd=tmp)
    expect(digest(labels) == before, f"x_labels.tif replaced (rc {first.returncode}, "
                                     f"{second.returncode}: {last_line(second.stderr)})")
    return (f"x_labels.tif unchanged; rc {first.returncode} then {second.returncode} "
            f"({last_line(second.stderr)})")


@check("D1 / R3.12: everything --overlay never replaces an input named <stem>_overlay.png")
def _(tmp: Path) -> str:
    ds = tmp / "ds"
    save_png(ds / "cell.png", seed=1)
    other = save_png(ds / "cell_overlay.png", seed=2)
    before = digest(other)
    res = cli("everything", ds, "--out", ds, "--overlay", *FAST, cwd=tmp)
    expect(digest(other) == before, f"cell_overlay.png replaced (rc {res.returncode})")
    return f"cell_overlay.png unchanged; rc {res.returncode} ({last_line(res.stderr)})"


@check("D3 / R3.14: segment --overlay keeps an existing <out stem>_overlay.png")
def _(tmp: Path) -> str:
    seg = tmp / "seg"
    save_png(seg / "a.png")
    other = save_png(seg / "res_overlay.png", seed=5)
    (tmp / "prompts.csv").write_text("object,row,col\nA,30,30\n")
    before = digest(other)
    res = cli("segment", seg / "a.png", "--prompts", tmp / "prompts.csv", "--out",
              seg / "res.tif", "--overlay", cwd=tmp)
    expect(digest(other) == before, f"res_overlay.png replaced (rc {res.returncode})")
    expect(res.returncode == 1 and not (seg / "res.tif").exists(),
           f"rc {res.returncode}, res.tif written: {(seg / 'res.tif').exists()}")
    return f"refused before the model ran, rc 1: {last_line(res.stderr)}"


@check("D12 / R3.60: evaluate -o never replaces an existing file")
def _(tmp: Path) -> str:
    ds = dataset(tmp / "ds")
    precious = tmp / "precious.json"
    precious.write_text('{"mine": 1}')
    res = cli("evaluate", ds, "--device", "cpu", "--no-everything", "--n-clicks", "1",
              "-o", precious, cwd=tmp)
    expect(precious.read_text() == '{"mine": 1}', f"replaced (rc {res.returncode})")
    expect(res.returncode == 1, f"rc {res.returncode}")
    return f"kept, rc 1: {last_line(res.stderr)}"


# ---------------------------------------------------------------- SIGTERM

@check("D12 / R3.45: SIGTERM ends a batch like Ctrl-C (rc 143, a message, no .tmp, resumes)")
def _(tmp: Path) -> str:
    inp, out = tmp / "in", tmp / "out"
    n = 12
    for i in range(n):
        save_png(inp / f"im{i:03d}.png", seed=i, shape=(64, 64))
    cmd = [*CLI, "everything", str(inp), "--out", str(out), "--overlay", *FAST]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        wait_while_running(proc, lambda: any(out.glob("*_labels.tif")), "a first output")
        os.kill(proc.pid, signal.SIGTERM)  # as `kill` or a cluster's scheduler does
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    names = sorted(p.name for p in out.iterdir())
    expect(proc.returncode == 143, f"rc {proc.returncode}: {last_line(stderr)}")
    expect("terminated (SIGTERM)" in last_line(stderr), f"last line: {last_line(stderr)}")
    expect(not [x for x in names if x.endswith(".tmp")], f"temporary files left: {names}")
    done = len([x for x in names if x.endswith("_labels.tif")])
    rerun = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=ENV, timeout=600)
    total = len(list(out.glob("*_labels.tif")))
    expect(rerun.returncode == 0 and total == n, f"resume: rc {rerun.returncode}, {total}/{n}")
    return f"rc 143, '{last_line(stderr)}', {done} outputs kept, the rerun finished {n}"


# ---------------------------------------------------------------- command-line options

def _usage_error(tmp: Path, *args: object, contains: str = "") -> str:
    save_png(tmp / "a.png")
    res = cli("everything", tmp / "a.png", "--out", tmp / "out", *args, cwd=tmp)
    expect(res.returncode == 2, f"rc {res.returncode}: {last_line(res.stderr)}")
    expect(contains in res.stderr, f"stderr lacks {contains!r}: {last_line(res.stderr)}")
    expect(not (tmp / "out").exists(), "outputs written")
    return f"rc 2: {last_line(res.stderr)}"


@check("D5 / R3.30: everything --pred-iou-thresh 7 is a usage error")
def _(tmp: Path) -> str:
    return _usage_error(tmp, "--pred-iou-thresh", "7", contains="--pred-iou-thresh")


@check("D5 / R3.31: everything --stability-score-thresh nan is a usage error")
def _(tmp: Path) -> str:
    return _usage_error(tmp, "--stability-score-thresh", "nan", contains="--stability-score")


@check("D5 / R3.32: --crop-n-points-downscale-factor 0 is a usage error (was ZeroDivisionError)")
def _(tmp: Path) -> str:
    return _usage_error(tmp, "--crop-n-layers", "1", "--crop-n-points-downscale-factor", "0",
                        contains="--crop-n-points-downscale-factor")


@check("D5 / R3.33: --crop-overlap-ratio 5 is a usage error (was a late ValueError)")
def _(tmp: Path) -> str:
    return _usage_error(tmp, "--crop-n-layers", "1", "--crop-overlap-ratio", "5",
                        contains="--crop-overlap-ratio")


@check("D12 / R3.34: --tile-size 10 is a usage error (exit 2, was 1)")
def _(tmp: Path) -> str:
    return _usage_error(tmp, "--tile-size", "10", contains="--tile-size")


@check("D12 / R3.35: --tile-size 64 --tile-overlap 64 is a usage error (exit 2, was 1)")
def _(tmp: Path) -> str:
    return _usage_error(tmp, "--tile-size", "64", "--tile-overlap", "64", contains="overlap")


@check("D12 / R3.24-25, U-CLI: -o and -m mean --out and --model in segment and everything")
def _(tmp: Path) -> str:
    save_png(tmp / "a.png")
    (tmp / "p.csv").write_text("row,col\n30,30\n")
    seg = cli("segment", tmp / "a.png", "--prompts", tmp / "p.csv", "-o", tmp / "r.tif",
              "-m", "default", cwd=tmp)
    every = cli("everything", tmp / "a.png", "-o", tmp / "e", "-m", "default", *FAST, cwd=tmp)
    expect(seg.returncode == 0 and (tmp / "r.tif").is_file(),
           f"segment rc {seg.returncode}: {last_line(seg.stderr)}")
    expect(every.returncode == 0 and (tmp / "e" / "a_labels.tif").is_file(),
           f"everything rc {every.returncode}: {last_line(every.stderr)}")
    return "segment and everything: rc 0, outputs written"


@check("D12 / R3.59: evaluate takes --device")
def _(tmp: Path) -> str:
    ds = dataset(tmp / "ds")
    res = cli("evaluate", ds, "--device", "cpu", "--no-everything", "--n-clicks", "1",
              "-o", tmp / "r.json", cwd=tmp)
    expect(res.returncode == 0, f"rc {res.returncode}: {last_line(res.stderr)}")
    n = json.loads((tmp / "r.json").read_text())["n_images"]
    return f"rc 0, {n} images evaluated"


@check("D10 / R3.56: evaluate with no images (--ids [] or --max-images 0) is an error, not NaN")
def _(tmp: Path) -> str:
    ds = dataset(tmp / "ds")
    (tmp / "ids.json").write_text("[]")
    base = ["evaluate", ds, "--no-everything", "--n-clicks", "1"]
    empty = cli(*base, "--ids", tmp / "ids.json", cwd=tmp)
    zero = cli(*base, "--max-images", "0", cwd=tmp)
    expect(empty.returncode == 1, f"--ids []: rc {empty.returncode}: {last_line(empty.stdout)}")
    expect(zero.returncode == 2, f"--max-images 0: rc {zero.returncode}")
    expect("nan" not in (empty.stdout + zero.stdout).lower(), "NaN metrics printed")
    return f"rc 1: {last_line(empty.stderr)} | rc 2: {last_line(zero.stderr)}"


@check("D9 / D11 / R3.57-58: evaluate --ids files {\"val\": 5} and broken JSON: clear errors")
def _(tmp: Path) -> str:
    ds = dataset(tmp / "ds")
    seen = []
    for text, expected in (('{"val": 5}', "must be a list"), ("{not json", "invalid JSON")):
        (tmp / "ids.json").write_text(text)
        res = cli("evaluate", ds, "--no-everything", "--n-clicks", "1", "--ids",
                  tmp / "ids.json", cwd=tmp)
        err = res.stderr.strip()
        expect(res.returncode == 1 and expected in err and "\n" not in err
               and "Traceback" not in err, f"{text}: rc {res.returncode}: {last_line(err)}")
        seen.append(last_line(err))
    return " | ".join(seen)


@check("D7 / R3.49-51: train --steps -5, --batch-size 0, --lr nan are usage errors")
def _(tmp: Path) -> str:
    ds = dataset(tmp / "ds")
    seen = []
    for option, value in (("--steps", "-5"), ("--batch-size", "0"), ("--lr", "nan")):
        res = cli("train", ds, "-o", tmp / "run", option, value, cwd=tmp)
        expect(res.returncode == 2 and "Traceback" not in res.stderr,
               f"{option} {value}: rc {res.returncode}: {last_line(res.stderr)}")
        expect(not (tmp / "run").exists(), f"{option} {value}: the run folder was written")
        seen.append(f"{option} {value}: rc 2")
    return ", ".join(seen) + "; nothing written"


@check("D7 / R3.52-53: train refuses a run folder of other weights; errors stay one short line")
def _(tmp: Path) -> str:
    import shutil

    import torch

    from napari_sam.models.build import build_sam
    from napari_sam.models.checkpoint import save_model
    from napari_sam.models.zoo import embedded_weights_path

    ds = dataset(tmp / "ds")
    first, other = tmp / "first.safetensors", tmp / "other.safetensors"
    shutil.copy(embedded_weights_path(), first)
    shutil.copy(embedded_weights_path(), other)
    run = tmp / "run"
    res = cli("train", ds, "-o", run, "-m", first, "--steps", "1", *TRAIN_FAST, cwd=tmp)
    expect(res.returncode == 0, f"first run: rc {res.returncode}: {last_line(res.stderr)}")
    config, weights = (run / "config.json").read_text(), digest(run / "last.safetensors")
    res = cli("train", ds, "-o", run, "-m", other, "--steps", "2", *TRAIN_FAST, cwd=tmp)
    expect(res.returncode == 1, f"another -m: rc {res.returncode}: {last_line(res.stderr)}")
    expect((run / "config.json").read_text() == config, "config.json rewritten")
    expect(digest(run / "last.safetensors") == weights, "weights changed")
    refused = last_line(res.stderr)
    # weights of another architecture in the run folder: one short line (was 43,219 chars)
    cfg = model().config
    bigger = build_sam(type(cfg).from_dict({**cfg.to_dict(), "decoder_mlp_dim": 2 * 256 + 8}))
    save_model(bigger, run / "last.safetensors")
    res = cli("train", ds, "-o", run, "-m", first, "--steps", "2", *TRAIN_FAST, cwd=tmp)
    err = res.stderr.strip()
    expect(res.returncode == 1 and "\n" not in err and len(err) < 600,
           f"rc {res.returncode}, {len(err)} characters: {last_line(err)}")
    # D11 / R2a.42: a last_state.pt holding other objects: refused with our words
    shutil.copy(first, run / "last.safetensors")
    torch.save({"step": 1, "optimizer": {}, "x": argparse.Namespace(a=1)},
               run / "last_state.pt")
    res = cli("train", ds, "-o", run, "-m", first, "--steps", "2", *TRAIN_FAST, cwd=tmp)
    state_err = res.stderr.strip()
    expect(res.returncode == 1 and "weights_only" not in state_err and "\n" not in state_err,
           f"crafted last_state.pt: rc {res.returncode}: {last_line(state_err)}")
    return f"refused: {refused[:100]}... | {len(err)}-character line | {state_err[:90]}..."


@check("U11 / R3.20: a 3-plane uint8 TIFF read as RGB says so")
def _(tmp: Path) -> str:
    import warnings

    import tifffile

    planes = np.stack([blobs((64, 64), seed=i) for i in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp / "stack.tif", planes)
    res = cli("everything", tmp / "stack.tif", "--out", tmp / "o", *FAST, cwd=tmp)
    expect(res.returncode == 0 and "planar RGB" in res.stderr,
           f"rc {res.returncode}, no notice: {last_line(res.stderr)}")
    note = next(x for x in res.stderr.splitlines() if "planar RGB" in x)
    return note[:150] + "..."


# ---------------------------------------------------------------- Python API, bad input

@check("D9 / R1b.15: ragged points raise InvalidInputError (was numpy's ValueError)")
def _(tmp: Path) -> str:
    from napari_sam.errors import InvalidInputError

    pred = predictor_on(blobs())
    return raises(lambda: pred.predict(points=[[1, 2], [3]]), InvalidInputError)


@check("D10 / R1b.61: complex point coordinates raise (the imaginary part was dropped)")
def _(tmp: Path) -> str:
    from napari_sam.errors import InvalidInputError

    pred = predictor_on(blobs())
    return raises(lambda: pred.predict(points=np.array([[10 + 1j, 20]])), InvalidInputError)


@check("R1b.53: a batch of 0 point prompts raises (was ignored)")
def _(tmp: Path) -> str:
    from napari_sam.errors import InvalidInputError

    pred = predictor_on(blobs())
    return raises(lambda: pred.predict(points=np.zeros((0, 1, 2)), box=[10, 10, 50, 50]),
                  InvalidInputError)


@check("D10 / R1b.38: a box far larger than the image gives masks (was 3 empty masks)")
def _(tmp: Path) -> str:
    pred = predictor_on(blobs())
    result = pred.predict(box=[-1e6, -1e6, 1e6, 1e6])
    areas = [int(m.sum()) for m in result.masks]
    expect(max(areas) > 0, f"every mask empty: areas {areas}")
    return f"mask areas {areas}"


@check("D10 / R1a.18: a float64 image spanning -1e308..1e308 is not flattened to zeros")
def _(tmp: Path) -> str:
    import warnings

    from napari_sam.engine.image import to_rgb_uint8

    img = np.array([[-1e308, 0.0], [1e308, 5e307]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = to_rgb_uint8(img)[..., 0]
    expect(out.max() > 0 and out.min() == 0, f"got {out.tolist()}")
    return f"mapped to {out.tolist()} without warnings"


@check("D9 / R2a.36: load_model(123) raises InvalidInputError (was TypeError)")
def _(tmp: Path) -> str:
    from napari_sam import load_model
    from napari_sam.errors import InvalidInputError

    return raises(lambda: load_model(123), InvalidInputError)


@check("D9 / R2c.7: NAPARI_SAM_CACHE='~nouser/x' raises InvalidInputError (was RuntimeError)")
def _(tmp: Path) -> str:
    from napari_sam.errors import InvalidInputError
    from napari_sam.models import zoo

    old = os.environ.get("NAPARI_SAM_CACHE")
    os.environ["NAPARI_SAM_CACHE"] = "~no_such_user_napari_sam/x"
    try:
        return raises(zoo.cache_dir, InvalidInputError, contains="NAPARI_SAM_CACHE")
    finally:
        if old is None:
            del os.environ["NAPARI_SAM_CACHE"]
        else:
            os.environ["NAPARI_SAM_CACHE"] = old


def _bad_generator(**kwargs: object) -> str:
    from napari_sam.errors import InvalidInputError

    return raises(lambda: generator(**kwargs).generate(blobs((64, 64))), InvalidInputError)


for _row, _kwargs in (
    ("R1c.27: crop_overlap_ratio=5", {"points_per_side": 8, "crop_n_layers": 1,
                                      "crop_overlap_ratio": 5}),
    ("R1c.28: crop_overlap_ratio=-1", {"points_per_side": 8, "crop_n_layers": 1,
                                       "crop_overlap_ratio": -1}),
    ("R1c.25: crop_n_points_downscale_factor=0", {"points_per_side": 4, "crop_n_layers": 3,
                                                  "crop_n_points_downscale_factor": 0}),
    ("R1c.12: pred_iou_thresh=1.5", {"points_per_side": 8, "pred_iou_thresh": 1.5}),
    ("R1c.14: pred_iou_thresh=nan", {"points_per_side": 8, "pred_iou_thresh": float("nan")}),
    ("R1c.15: stability_score_thresh=2", {"points_per_side": 8, "stability_score_thresh": 2}),
    ("R1c.17: stability_score_thresh=nan", {"points_per_side": 8,
                                            "stability_score_thresh": float("nan")}),
    ("R1c.22: box_nms_thresh=-1", {"points_per_side": 8, "box_nms_thresh": -1}),
    ("R1c.36: point grids outside [0, 1]", {"points_per_side": None,
                                            "point_grids": [np.array([[0.5, 2.0]])]}),
    ("R1c.37: point grids with NaN", {"points_per_side": None,
                                      "point_grids": [np.array([[np.nan, 0.5]])]}),
    ("R1c.9: points_per_side=100000", {"points_per_side": 100000}),
    ("R1c.6: points_per_side='abc'", {"points_per_side": "abc"}),
    ("R1c.30: crop_n_layers=8", {"points_per_side": 8, "crop_n_layers": 8}),
    # rows the review marked ACCEPTED (no validation); the ranges now refuse them
    ("R1c.5: points_per_side=2.7", {"points_per_side": 2.7}),
    ("R1c.13: pred_iou_thresh=-1", {"points_per_side": 8, "pred_iou_thresh": -1}),
    ("R1c.16: stability_score_thresh=-1", {"points_per_side": 8, "stability_score_thresh": -1}),
    ("R1c.18: stability_score_offset=-1", {"points_per_side": 8, "stability_score_offset": -1}),
    ("R1c.21: box_nms_thresh=5", {"points_per_side": 8, "box_nms_thresh": 5}),
    ("R1c.31: min_mask_region_area=-5", {"points_per_side": 8, "min_mask_region_area": -5}),
):
    check(f"D5 / {_row} raises InvalidInputError")(
        lambda tmp, kw=_kwargs: _bad_generator(**kw))


@check("D10 / R1c.38: a 1x1 image with both thresholds 0 gives no area-0 records")
def _(tmp: Path) -> str:
    records = generator(points_per_side=8, pred_iou_thresh=0.0,
                        stability_score_thresh=0.0).generate(np.full((1, 1), 200, np.uint8))
    empty = [r for r in records if r["area"] == 0]
    expect(not empty, f"{len(empty)} of {len(records)} records have area 0")
    return f"{len(records)} records, none empty"


@check("D11 / R1d.8: NaN in generate_tiled's input is reported as NaN, not contrast_limits")
def _(tmp: Path) -> str:
    from napari_sam.engine.tiles import generate_tiled
    from napari_sam.errors import InvalidInputError

    img = np.random.default_rng(0).random((300, 300))
    img[5, 5] = np.nan
    line = raises(lambda: generate_tiled(generator(points_per_side=4), img, tile_size=256,
                                         overlap=32), InvalidInputError, contains="NaN")
    expect("contrast_limits" not in line, line)
    return line


@check("D11 / R1d.9: a stack given to generate_tiled is named with its own shape")
def _(tmp: Path) -> str:
    from napari_sam.engine.tiles import generate_tiled
    from napari_sam.errors import InvalidInputError

    stack = np.zeros((2, 300, 696), np.uint8)
    return raises(lambda: generate_tiled(generator(points_per_side=4), stack, tile_size=256,
                                         overlap=32), InvalidInputError, contains="(2, 300, 696)")


@check("D5 / R1d.4, R1d.10: generate_tiled refuses tile_size=1 and contain_thresh=5")
def _(tmp: Path) -> str:
    from napari_sam.engine.tiles import generate_tiled
    from napari_sam.errors import InvalidInputError

    img = blobs((64, 64))
    gen = generator(points_per_side=4)
    tiny = raises(lambda: generate_tiled(gen, img, tile_size=1, overlap=0), InvalidInputError)
    contain = raises(lambda: generate_tiled(gen, img, tile_size=32, overlap=8, contain_thresh=5,
                                            merge_iou=-1), InvalidInputError)
    return f"{tiny} | {contain}"


# ---------------------------------------------------------------- checkpoints

@check("D4 / R2a.41: a 540-byte file declaring a huge ViT is refused before allocating")
def _(tmp: Path) -> str:
    import torch
    from safetensors.torch import save_file

    from napari_sam.models.build import MODEL_CONFIGS
    from napari_sam.models.checkpoint import CONFIG_METADATA_KEY

    cfg = MODEL_CONFIGS["vit_h"].to_dict()
    cfg["encoder"].update(embed_dim=4096, num_heads=16, depth=48, global_attn_indexes=[47])
    big = tmp / "big.safetensors"
    save_file({"x": torch.zeros(1)}, str(big),
              metadata={CONFIG_METADATA_KEY: json.dumps(cfg), "format": "pt"})
    # a 3 GB address-space limit: the old code needed about 38 GB
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
              "import napari_sam\n"
              "try:\n    napari_sam.load_model(sys.argv[1], device='cpu')\n"
              "except Exception as e:\n"
              "    print(type(e).__name__ + ': ' + str(e).splitlines()[0][:160])\n")
    res = subprocess.run([sys.executable, "-c", script, str(big)], capture_output=True,
                         text=True, env=ENV, timeout=300)
    out = res.stdout.strip()
    expect(res.returncode == 0 and out.startswith("CheckpointError"),
           f"rc {res.returncode}: {out or last_line(res.stderr)}")
    return out


def _embedded_state() -> dict:
    from napari_sam.models.checkpoint import load_state_dict
    from napari_sam.models.zoo import embedded_weights_path

    return dict(load_state_dict(embedded_weights_path())[0])


@check("D10 / R2a.18: a checkpoint with NaN weights is refused (predictions were NaN)")
def _(tmp: Path) -> str:
    import torch

    from napari_sam import load_model
    from napari_sam.errors import CheckpointError

    sd = _embedded_state()
    key = next(k for k in sd if k.startswith("mask_decoder") and sd[k].is_floating_point())
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    torch.save(sd, tmp / "nan.pth")
    return raises(lambda: load_model(str(tmp / "nan.pth"), device="cpu"), CheckpointError,
                  contains="NaN")


@check("D11 / R2a.8: a pickle calling a torch.* function is 'unsafe', not 'corrupt'")
def _(tmp: Path) -> str:
    import torch

    from napari_sam import load_model
    from napari_sam.errors import CheckpointError

    marker = tmp / "fetched.bin"
    (tmp / "src.bin").write_bytes(b"x")

    class Fetch:
        def __reduce__(self):
            return (torch.hub.download_url_to_file,
                    ((tmp / "src.bin").as_uri(), str(marker), None, False))

    torch.save({"image_encoder.pos_embed": torch.zeros(1), "evil": Fetch()}, tmp / "e.pth")
    line = raises(lambda: load_model(str(tmp / "e.pth"), device="cpu"), CheckpointError,
                  contains="unsafe")
    expect("corrupt" not in line and not marker.exists(), line)
    return line


@check("D11 / R2a.30: a mis-shaped tensor is named with both shapes (not 'window sizes')")
def _(tmp: Path) -> str:
    import torch

    from napari_sam import load_model
    from napari_sam.errors import CheckpointError

    sd = _embedded_state()
    key = "image_encoder.blocks.1.attn.rel_pos_h"
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    torch.save(sd, tmp / "wrongshape.pth")
    line = raises(lambda: load_model(str(tmp / "wrongshape.pth"), device="cpu"),
                  CheckpointError, contains=key)
    expect("window sizes" not in line, line)
    return line


# ---------------------------------------------------------------- model cache

@check("D14 / R2b.13: a damaged file in the model cache is detected, not returned")
def _(tmp: Path) -> str:
    from napari_sam.errors import DownloadError
    from napari_sam.models import zoo

    payload = os.urandom(4096)
    (tmp / "published.pth").write_bytes(payload)
    info = zoo.ModelInfo("repro", "", (tmp / "published.pth").as_uri(),
                         "sha256:" + hashlib.sha256(payload).hexdigest(), "repro.pth", 0.1,
                         "test model")
    zoo.ZOO["repro"] = info
    try:
        cache = tmp / "cache"
        dest = zoo.download_checkpoint("repro", cache_dir=cache, progress=False)
        with open(dest, "ab") as f:
            f.write(b"appended by another process")
        line = raises(lambda: zoo.download_checkpoint("repro", cache_dir=cache,
                                                      progress=False), DownloadError)
        expect(dest.exists(), "the user's file was deleted")
        return line
    finally:
        del zoo.ZOO["repro"]


_DOWNLOAD = """
import sys
from napari_sam.models import zoo
zoo.ZOO["repro"] = zoo.ModelInfo("repro", "", sys.argv[1], sys.argv[2], "repro.pth", 0.1, "x")
print(zoo.download_checkpoint("repro", cache_dir=sys.argv[3], progress=True))
"""


def _paused_server(payload: bytes, pause_after: int):
    """A server on 127.0.0.1 with Range support whose first response stops after
    ``pause_after`` bytes until ``server.gate`` is set (the review's slow server, made
    deterministic)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Paused(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range",
                                 f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.server.requests += 1
            body = payload[start:]
            try:
                if self.server.requests == 1:
                    self.wfile.write(body[:pause_after])
                    self.wfile.flush()
                    self.server.gate.wait(300)
                    body = body[pause_after:]
                self.wfile.write(body)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Paused)
    server.requests, server.gate = 0, threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@check("D2 / R2c.8: two processes downloading the same model leave a hash-valid file")
def _(tmp: Path) -> str:
    from napari_sam.models import zoo

    payload = os.urandom(3 * 2**20)
    expected = "sha256:" + hashlib.sha256(payload).hexdigest()
    server = _paused_server(payload, pause_after=2**20)
    url, cache = f"http://127.0.0.1:{server.server_address[1]}/m.pth", tmp / "cache"
    cmd = [sys.executable, "-c", _DOWNLOAD, url, expected, str(cache)]
    waited = ""
    try:
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=ENV)
        wait_while_running(first, lambda: any(cache.glob(".repro.pth.download-*/*")),
                           "the first download")  # a file in its staging folder
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=ENV)
        for line in second.stderr:  # the old code appended to the first one's .part here
            if "Another process" in line or server.requests > 1:
                waited = line.strip()
                break
        server.gate.set()
        _, err1 = first.communicate(timeout=300)
        _, err2 = second.communicate(timeout=300)
    finally:
        server.gate.set()
        server.shutdown()
        server.server_close()
    dest = cache / "repro.pth"
    expect(bool(waited), "the second process did not wait for the first")
    expect(first.returncode == 0, f"first: rc {first.returncode}: {last_line(err1)}")
    expect(second.returncode == 0, f"second: rc {second.returncode}: {last_line(err2)}")
    expect(dest.read_bytes() == payload,
           f"the cached file is {dest.stat().st_size} bytes, not the published ones")
    zoo.ZOO["repro"] = zoo.ModelInfo("repro", "", url, expected, "repro.pth", 0.1, "x")
    try:  # the server is gone: a later call must find the cached file valid
        zoo.download_checkpoint("repro", cache_dir=cache, progress=False)
    finally:
        del zoo.ZOO["repro"]
    return (f"both rc 0, {server.requests} request(s), the cache holds the published bytes; "
            f"second: {waited[:90]}...")


@check("D13 / R5.7: the batch generator cache stays bounded")
def _(tmp: Path) -> str:
    from napari_sam.engine import batch

    for i in range(3 * batch.GENERATOR_CACHE_SIZE):
        batch.get_generator(None, "cpu", {"points_per_side": 4 + i})
    size = len(batch._GENERATORS)
    expect(size <= batch.GENERATOR_CACHE_SIZE, f"{size} generators cached")
    return f"{3 * batch.GENERATOR_CACHE_SIZE} parameter sets -> {size} generators cached"


# ---------------------------------------------------------------- runner

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="run only checks whose name contains this")
    parser.add_argument("-v", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    chosen = [c for c in CHECKS if args.k.lower() in c.name.lower()]
    failed = 0
    for c in chosen:
        with tempfile.TemporaryDirectory(prefix="review_repro_") as tmp:
            try:
                what, ok = c.run(Path(tmp)), True
            except Failed as exc:
                what, ok = str(exc), False
            except Exception as exc:
                what, ok = f"the check itself broke: {first_line(exc)}", False
                if args.v:
                    traceback.print_exc()
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {c.name}\n      {what}", flush=True)
    print(f"\n{len(chosen) - failed} passed, {failed} failed, of {len(chosen)} checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
