"""``napari-sam embed``: the real command in subprocesses, real TIFF stacks in tmp_path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_sam.cli import main


def _cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "napari_sam.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _write_stack(path: Path, n: int = 5, seed: int = 0, shape=(64, 60)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3000, size=(n, *shape), dtype=np.uint16)
    tifffile.imwrite(path, data)
    return data


@pytest.fixture
def tiny_model_path(tiny_sam, tmp_path):
    from napari_sam.models.checkpoint import save_model

    return save_model(tiny_sam, tmp_path / "tiny.safetensors")


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def _fresh_plane(model_path: Path, image: Path, z: int) -> torch.Tensor:
    """The embedding of plane z computed without any store, as the CLI normalises it."""
    from napari_sam.engine.io import read_image
    from napari_sam.engine.predictor import Predictor
    from napari_sam.models.zoo import load_model

    loaded = read_image(image)
    predictor = Predictor(load_model(model_path, device="cpu"))
    return predictor.compute_embedding(loaded.plane_rgb(loaded.data[z]))


def test_embed_writes_beside_the_image_and_a_rerun_is_a_no_op(tiny_model_path, tmp_path):
    from napari_sam.engine.store import EmbeddingStore, find_store

    image = tmp_path / "stack.tif"
    _write_stack(image)
    res = _cli("embed", image, "-m", tiny_model_path)
    assert res.returncode == 0, res.stderr
    store_path = tmp_path / "stack.tif.sam.zarr"
    assert res.stdout.strip() == str(store_path)
    assert "embedding [" in res.stderr and "5/5" in res.stderr
    assert "wrote 5 embeddings" in res.stderr
    store = find_store(image)
    assert store.complete and len(store) == 5 and store.signature.model_name == str(
        tiny_model_path)
    for z in (0, 4):
        assert torch.equal(store.plane((z,)).features, _fresh_plane(tiny_model_path, image, z))

    before = _files(store_path)
    res = _cli("embed", image, "-m", tiny_model_path)
    assert res.returncode == 0, res.stderr
    assert "is up to date" in res.stderr and "nothing to do" in res.stderr
    assert "embedding [" not in res.stderr
    assert _files(store_path) == before
    assert EmbeddingStore.open(store_path).complete


def test_embed_refuses_another_model_or_image_and_overwrite_replaces(
        tiny_model_path, tiny_sam_config, tmp_path, capsys):
    from napari_sam.engine.store import EmbeddingStore
    from napari_sam.models.checkpoint import save_model
    from reference_utils import build_random_sam

    image = tmp_path / "stack.tif"
    _write_stack(image)
    out = tmp_path / "emb.zarr"
    base = ["embed", str(image), "--out", str(out)]
    assert main([*base, "-m", str(tiny_model_path)]) == 0
    capsys.readouterr()
    before = _files(out)

    other = save_model(build_random_sam(tiny_sam_config, seed=1), tmp_path / "other.safetensors")
    assert main([*base, "-m", str(other)]) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("napari-sam: error: ")
    assert f"model: the store holds '{tiny_model_path}'" in line and "other.safetensors" in line
    assert "pass --overwrite to replace it" in line and "Traceback" not in err
    assert _files(out) == before

    _write_stack(image, seed=5)  # the same file name, other pixels
    assert main([*base, "-m", str(tiny_model_path)]) == 1
    assert "image: same shape (5, 64, 60) but other pixels" in capsys.readouterr().err
    assert _files(out) == before

    assert main([*base, "-m", str(other), "--overwrite"]) == 0
    store = EmbeddingStore.open(out)
    assert store.complete and store.signature.model_name == str(other)
    assert torch.equal(store.plane((2,)).features, _fresh_plane(other, image, 2))


def _start_and_stop(args: list[str], sig: int, after: int) -> int:
    """Run the command, send ``sig`` once ``after`` more planes were reported; its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "napari_sam.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = 0
        for line in proc.stderr:  # one progress line per plane (not a terminal)
            seen += line.startswith("embedding [")
            if seen == after:
                break
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_embed_resumes_after_the_process_is_terminated_or_killed(tiny_model_path, tmp_path):
    """A run stopped mid-way (SIGTERM: exit 143; SIGKILL) keeps its finished planes; the
    next run computes only the missing ones, and the store ends equal to a fresh one."""
    from napari_sam.engine.store import EmbeddingStore

    image = tmp_path / "stack.tif"
    n = 60
    _write_stack(image, n=n)
    out = tmp_path / "emb.zarr"
    args = ["embed", str(image), "--out", str(out), "-m", str(tiny_model_path)]
    assert _start_and_stop(args, signal.SIGTERM, after=3) == 143
    first = int(EmbeddingStore.open(out).done().sum())
    assert 3 <= first < n
    assert _start_and_stop(args, signal.SIGKILL, after=3) == -signal.SIGKILL
    done = EmbeddingStore.open(out).done()
    assert first + 3 <= done.sum() < n, done.sum()

    res = _cli(*args)
    assert res.returncode == 0, res.stderr
    assert f"computed the {n - int(done.sum())} missing of {n} embeddings" in res.stderr
    store = EmbeddingStore.open(out)
    assert store.complete
    for z in (0, int(done.sum()) - 1, int(done.sum()), n - 1):
        assert torch.equal(store.plane((z,)).features, _fresh_plane(tiny_model_path, image, z))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_embed_usage_and_runtime_errors(tiny_model_path, tmp_path, capsys):
    image = tmp_path / "stack.tif"
    _write_stack(image, n=2)
    # usage errors: exit 2, nothing written
    for args in (["--tile-size", "8"], ["--tile-size", "abc"], ["--out", str(tmp_path / "x.txt")],
                 ["--tile-size", "64", "--tile-overlap", "64"], ["--tile-overlap", "-1"]):
        assert main(["embed", str(image), "-m", str(tiny_model_path), *args]) == 2, args
    err = capsys.readouterr().err
    assert "--tile-size" in err and ".zarr" in err and "--tile-overlap" in err
    assert not (tmp_path / "stack.tif.sam.zarr").exists()
    # runtime errors: exit 1, one line
    assert main(["embed", str(tmp_path / "nope.tif"), "-m", str(tiny_model_path)]) == 1
    assert capsys.readouterr().err.strip().endswith("no such file.")
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "data.txt").write_text("mine")
    assert main(["embed", str(image), "--out", str(mine), "-m", str(tiny_model_path),
                 "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "is not a napari-sam embedding store, so it is never replaced" in err
    assert err.strip().count("\n") <= 1 and (mine / "data.txt").read_text() == "mine"


def test_embed_tiles_large_planes(tiny_model_path, tmp_path, capsys):
    from napari_sam.engine.store import EmbeddingStore
    from napari_sam.engine.tiles import tile_boxes

    image = tmp_path / "plane.tif"
    _write_stack(image, n=1, shape=(100, 90))
    data = tifffile.imread(image)[0]
    tifffile.imwrite(image, data)  # a 2D image
    out = tmp_path / "emb.zarr"
    assert main(["embed", str(image), "--out", str(out), "-m", str(tiny_model_path),
                 "--tile-size", "48", "--tile-overlap", "8"]) == 0
    store = EmbeddingStore.open(out)
    boxes = [tuple(int(v) for v in row[1:5]) for row in store.geometry]
    tiles = tile_boxes((100, 90), tile_size=48, overlap=8)
    assert boxes == [(0, 0, 100, 90), *tiles] and len(tiles) > 1
    assert store.stack_shape == () and store.complete
    assert f"{len(boxes)}/{len(boxes)} image" in capsys.readouterr().err


def test_embed_is_listed_in_the_help():
    res = _cli("--help")
    assert res.returncode == 0 and "embed" in res.stdout
    res = _cli("embed", "--help")
    assert res.returncode == 0 and "--tile-size" in res.stdout and "--overwrite" in res.stdout


def test_segment_reads_the_store_beside_the_image(tiny_model_path, tiny_sam_config, tmp_path,
                                                  capsys, monkeypatch):
    """`napari-sam segment` finds IMAGE.sam.zarr and never runs the encoder; a store of other
    weights beside the image is not used (one note) and the result is the same."""
    from PIL import Image

    from napari_sam.engine.io import read_labels
    from napari_sam.engine.predictor import Predictor
    from napari_sam.models.checkpoint import save_model
    from reference_utils import build_random_sam

    rng = np.random.default_rng(3)
    image = tmp_path / "cells.png"
    Image.fromarray(rng.integers(0, 255, size=(70, 80, 3), dtype=np.uint8)).save(image)
    (tmp_path / "p.csv").write_text("object,row,col,label\na,30,40,1\nb,10,10,1\n")
    seg = ["segment", str(image), "--prompts", str(tmp_path / "p.csv"), "-m",
           str(tiny_model_path), "--device", "cpu"]
    assert main([*seg, "--out", str(tmp_path / "fresh.tif")]) == 0
    assert "embeddings" not in capsys.readouterr().err  # no store yet

    assert main(["embed", str(image), "-m", str(tiny_model_path)]) == 0
    capsys.readouterr()

    def no_encoder(self, rgb):
        raise AssertionError("the encoder ran although the store holds the embedding")

    with monkeypatch.context() as patch:
        patch.setattr(Predictor, "compute_embedding", no_encoder)
        assert main([*seg, "--out", str(tmp_path / "stored.tif")]) == 0
    err = capsys.readouterr().err
    assert f"napari-sam: note: reading embeddings from {image}.sam.zarr (1 of 1 stored)" in err
    np.testing.assert_array_equal(read_labels(tmp_path / "stored.tif"),
                                  read_labels(tmp_path / "fresh.tif"))

    other = save_model(build_random_sam(tiny_sam_config, seed=1), tmp_path / "other.safetensors")
    assert main(["embed", str(image), "-m", str(other), "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*seg, "--out", str(tmp_path / "again.tif")]) == 0
    err = capsys.readouterr().err
    assert "note: not using the embeddings beside the image:" in err
    assert "was made for model" in err
    np.testing.assert_array_equal(read_labels(tmp_path / "again.tif"),
                                  read_labels(tmp_path / "fresh.tif"))
