"""Training a mask refiner: samples from a model's own masks, the loop, resume, the script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam.models.mask_refiner import REFINER_CROP
from napari_sam.training.refiner import refiner_samples, train_refiner, with_refiner

ROOT = Path(__file__).resolve().parents[2]


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((80, 100), np.uint16)
    img = rng.integers(0, 30, (80, 100)).astype(np.uint8)
    for k in range(1, 4):
        r, c = 15 + 20 * (k - 1), 20 + 25 * (k - 1)
        labels[r:r + 12, c:c + 15] = k
        img[r:r + 12, c:c + 15] = 180
    return np.repeat(img[..., None], 3, -1), labels


def test_samples_hold_three_prompts_per_object(tiny_sam):
    samples = refiner_samples(tiny_sam, [_pair(0), _pair(1)], max_objects=2)
    assert samples.x.shape == (2 * 2 * 3, 6, REFINER_CROP, REFINER_CROP)
    assert samples.y.shape == (12, REFINER_CROP, REFINER_CROP)
    assert sorted(np.bincount(samples.kind)) == [4, 4, 4]
    # every target holds its object (the random model's masks may be large: its
    # windows too), and only part of its window
    frac = samples.y.astype(np.float32).mean((1, 2))
    assert np.all(frac > 0.001) and np.all(frac < 0.9)
    # the positive point map of a click sample is lit; a box sample has none
    assert samples.x[samples.kind == 0][:, 4].max() > 0.9
    assert samples.x[samples.kind == 2][:, 4].max() == 0


def test_training_resumes_to_the_same_weights(tiny_sam):
    samples = refiner_samples(tiny_sam, [_pair(2)], max_objects=3)
    states = []
    straight = train_refiner(samples, steps=4, batch_size=4, widths=(4, 8),
                             checkpoint=states.append, checkpoint_every=2)
    assert [s["step"] for s in states] == [2, 4]
    resumed = train_refiner(samples, steps=4, batch_size=4, widths=(4, 8), state=states[0])
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    model = with_refiner(tiny_sam, straight)
    assert model.config.refiner_widths == (4, 8)
    for key, value in tiny_sam.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


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
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_refiner.py"), *map(
        str, args)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_script_saves_a_model_with_its_refiner_and_protects_other_runs(tiny_sam, tmp_path):
    from napari_sam.models import load_model
    from napari_sam.models.checkpoint import save_model

    model_path = save_model(tiny_sam, tmp_path / "tiny.safetensors")
    data = _dataset(tmp_path / "data")
    run = tmp_path / "run"
    res = _script(model_path, data, "-o", run, "--steps", "2", "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    model = load_model(run / "model.safetensors")
    assert model.mask_refiner is not None
    assert (run / "samples.npz").is_file() and (run / "refiner_state.pt").is_file()
    # other settings in the same folder: refused, nothing replaced
    before = (run / "model.safetensors").read_bytes()
    res = _script(model_path, data, "-o", run, "--steps", "3", "--batch-size", "4")
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--max-objects", "0"]])
def test_script_refuses_bad_numbers(tmp_path, bad):
    res = _script("default", tmp_path, "-o", tmp_path / "run", *bad)
    assert res.returncode == 2 and "must be >= 1" in res.stderr


def test_correction_samples_follow_each_click_with_a_second_point(tiny_sam):
    pairs = [_pair(0), _pair(1)]
    corrections = refiner_samples(tiny_sam, pairs, max_objects=2, prompts="corrections")
    assert set(np.unique(corrections.kind)) == {3}
    assert 0 < len(corrections.x) <= 2 * 2 * 2  # one per click, none where already perfect
    # the first click is always positive; the correction is either (both point maps used)
    assert corrections.x[:, 4].max() > 0.9
    both = refiner_samples(tiny_sam, pairs, max_objects=2, prompts="both")
    base = refiner_samples(tiny_sam, pairs, max_objects=2)
    # the same objects and clicks: "both" is the base samples plus the corrections
    assert sorted(np.bincount(both.kind, minlength=4)) == sorted(
        [*np.bincount(base.kind, minlength=3), len(corrections.x)])
    np.testing.assert_array_equal(both.x[both.kind == 3], corrections.x)
    np.testing.assert_array_equal(both.x[both.kind != 3], base.x)
    joined = base + corrections
    assert len(joined.x) == len(both.x) and joined.kind.dtype == np.int8


def test_prompts_must_be_named(tiny_sam):
    from napari_sam.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="prompts must be"):
        refiner_samples(tiny_sam, [_pair(0)], prompts="some")


def test_warm_start_begins_from_the_given_weights(tiny_sam):
    samples = refiner_samples(tiny_sam, [_pair(2)], max_objects=1)
    first = train_refiner(samples, steps=2, batch_size=2, widths=(4, 8))
    warm = train_refiner(samples, steps=1, batch_size=2, widths=(4, 8), lr=1e-12,
                         init=first.state_dict())
    # the weights (not BatchNorm's running statistics, which a training step updates)
    for a, b in zip(first.parameters(), warm.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    cold = train_refiner(samples, steps=1, batch_size=2, widths=(4, 8), lr=1e-12)
    assert not all(torch.allclose(a, b) for a, b in zip(first.parameters(), cold.parameters(),
                                                                     strict=True))


def test_script_learns_corrections_and_warm_starts(tiny_sam, tmp_path):
    from napari_sam.models import load_model
    from napari_sam.models.checkpoint import save_model

    model_path = save_model(tiny_sam, tmp_path / "tiny.safetensors")
    data = _dataset(tmp_path / "data")
    res = _script(model_path, data, "-o", tmp_path / "cold", "--warm-start", "--steps", "2")
    assert res.returncode == 1 and "has no mask refiner" in res.stderr
    res = _script(model_path, data, "-o", tmp_path / "run", "--steps", "2", "--batch-size", "4",
                  "--corrections")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "corrections.npz").is_file()
    first = tmp_path / "run" / "model.safetensors"
    res = _script(first, data, "-o", tmp_path / "warm", "--steps", "2", "--batch-size", "4",
                  "--warm-start")
    assert res.returncode == 0, res.stderr
    assert load_model(tmp_path / "warm" / "model.safetensors").mask_refiner is not None
