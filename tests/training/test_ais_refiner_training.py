"""Training an AIS map refiner: images from a model's own maps, the loop, resume, the script."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam.models.build import build_sam
from napari_sam.training.ais_refiner import (
    ais_refiner_images,
    train_ais_refiner,
    with_ais_refiner,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def head_model(tiny_sam_config):
    torch.manual_seed(1)
    return build_sam(dataclasses.replace(tiny_sam_config, ais_head_hidden=16)).eval()


def _pair(seed: int, shape=(80, 100)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    img = rng.integers(0, 30, shape).astype(np.uint8)
    for k in range(1, 4):
        r, c = 15 + 20 * (k - 1), 20 + 25 * (k - 1)
        labels[r:r + 12, c:c + 15] = k
        img[r:r + 12, c:c + 15] = 180
    return np.repeat(img[..., None], 3, -1), labels


def test_images_hold_the_head_maps_and_the_targets(head_model):
    from napari_sam.engine.ais import InstanceSegmenter

    items = list(ais_refiner_images(head_model, [_pair(0), _pair(1, (40, 50))]))
    assert [i.maps.shape for i in items] == [(4, 80, 100), (4, 40, 50)]
    rgb, labels = _pair(0)
    np.testing.assert_allclose(items[0].maps.astype(np.float32),
                               InstanceSegmenter(head_model).maps(rgb), atol=1e-3)
    # targets: foreground is the objects, the centre peaks at 1 inside each
    assert np.array_equal(items[0].targets[0] > 0.5, labels > 0)
    assert items[0].targets[2].max() == 1


def test_training_resumes_to_the_same_weights_and_learns(head_model):
    data = list(ais_refiner_images(head_model, [_pair(2), _pair(3, (50, 40))]))
    states = []
    straight = train_ais_refiner(data, steps=4, crop=32, batch_size=2, widths=(4, 8),
                                 checkpoint=states.append, checkpoint_every=2)
    assert [s["step"] for s in states] == [2, 4]
    resumed = train_ais_refiner(data, steps=4, crop=32, batch_size=2, widths=(4, 8),
                                state=states[0])
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    model = with_ais_refiner(head_model, straight)
    assert model.config.ais_refiner_widths == (4, 8)
    for key, value in head_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    # a few more steps bring the maps closer to the truth than the random head's
    from napari_sam.engine.ais import refine_maps
    from napari_sam.training.dense_targets import dense_loss

    trained = train_ais_refiner(data, steps=60, crop=32, batch_size=4, widths=(4, 8), lr=1e-2)

    def loss(maps, item):
        logits = torch.logit(torch.from_numpy(maps).clamp(1e-3, 1 - 1e-3))[None]
        return float(dense_loss(logits, torch.from_numpy(item.targets.astype(np.float32))[None]))

    item = data[0]
    before = loss(item.maps.astype(np.float32), item)
    after = loss(refine_maps(trained, item.rgb, item.maps), item)
    assert after < 0.8 * before


def _dataset(root: Path) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(2):
        rgb, labels = _pair(k)
        Image.fromarray(rgb).save(root / "images" / f"im{k}.png")
        Image.fromarray(labels).save(root / "labels" / f"im{k}.png")
    return root


def _script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_ais_refiner.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_script_saves_a_model_with_its_refiner_and_protects_other_runs(
        head_model, tiny_sam, tmp_path):
    from napari_sam.engine.ais import InstanceSegmenter
    from napari_sam.models import load_model
    from napari_sam.models.checkpoint import save_model

    data = _dataset(tmp_path / "data")
    no_head = save_model(tiny_sam, tmp_path / "nohead.safetensors")
    res = _script(no_head, data, "-o", tmp_path / "x", "--steps", "1")
    assert res.returncode == 1 and "no AIS head" in res.stderr
    model_path = save_model(head_model, tmp_path / "head.safetensors")
    run = tmp_path / "run"
    res = _script(model_path, data, "-o", run, "--steps", "2", "--batch-size", "2",
                  "--crop", "32")
    assert res.returncode == 0, res.stderr
    model = load_model(run / "model.safetensors")
    assert model.ais_refiner is not None and InstanceSegmenter(model).refiner is not None
    assert sorted(p.name for p in (run / "maps").iterdir()) == ["im0.npz", "im1.npz"]
    # other settings in the same folder: refused, nothing replaced
    before = (run / "model.safetensors").read_bytes()
    res = _script(model_path, data, "-o", run, "--steps", "3", "--batch-size", "2",
                  "--crop", "32")
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--crop", "8"]])
def test_script_refuses_bad_numbers(tmp_path, bad):
    res = _script("default", tmp_path, "-o", tmp_path / "run", *bad)
    assert res.returncode == 2 and ">= 1" in res.stderr
