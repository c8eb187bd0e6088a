"""Tests of napari_sam.training: datasets, prompt simulation, losses, the training loop."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from training_helpers import disk_image, run_config, write_dataset

from napari_sam.errors import InvalidInputError
from napari_sam.training.augment import AugmentConfig, augment_geometry, augment_intensity
from napari_sam.training.config import TrainConfig
from napari_sam.training.datasets import InstanceDataset, find_pairs, load_ids, split_ids
from napari_sam.training.losses import (
    dice_loss,
    focal_loss,
    logits_mask_iou,
    sam_loss,
    soft_targets,
)
from napari_sam.training.optim import learning_rate
from napari_sam.training.prompts import (
    boxes_from_masks,
    correction_points,
    innermost_points,
    jitter_boxes,
    sample_instances,
    sample_points_in_masks,
)
from napari_sam.training.trainer import train

# ------------------------------------------------------------------------ helpers


# ----------------------------------------------------------------------- datasets


def test_dataset_folder_layout_and_sample(tmp_path):
    root = write_dataset(tmp_path / "d", n=3, size=48)
    ds = InstanceDataset(root, img_size=64, low_res_size=16)
    assert len(ds) == 3 and ds.ids == ["im0", "im1", "im2"]
    s = ds[0]
    assert s.image.shape == (3, 64, 64) and s.image.dtype == torch.float32
    assert s.labels.shape == (64, 64) and s.labels_low.shape == (16, 16)
    assert s.input_size == (64, 64)
    # labels are aligned with the bright disks after the resize
    fg = s.labels > 0
    assert s.image[0][fg].mean() > s.image[0][~fg].mean() + 1.0
    assert set(s.labels.unique().tolist()) == set(s.labels_low.unique().tolist())


def test_dataset_flat_tif_layout(tmp_path):
    for i in range(2):
        img, lab = disk_image(40, seed=i)
        tifffile.imwrite(tmp_path / f"cells{i}.tif", img.astype(np.uint16) * 100)
        tifffile.imwrite(tmp_path / f"cells{i}_labels.tif", lab.astype(np.int32))
    pairs = find_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["cells0", "cells1"]
    assert pairs[0][2].name == "cells0_labels.tif"
    ds = InstanceDataset(tmp_path, img_size=32)
    img, lab = ds.load(1)
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8 and lab.max() > 0


def test_dataset_pairs_list_and_padding(tmp_path):
    img, lab = disk_image(40)
    img = img[:, :20]
    lab = lab[:, :20]
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(lab).save(tmp_path / "b.png")
    ds = InstanceDataset([(tmp_path / "a.png", tmp_path / "b.png")], img_size=80)
    s = ds[0]
    assert s.input_size == (80, 40)
    assert (s.labels[:, 40:] == 0).all() and (s.image[:, :, 40:] == 0).all()


def test_dataset_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        InstanceDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="No images"):
        InstanceDataset(tmp_path / "empty")

    root = write_dataset(tmp_path / "missing", n=3)
    (root / "labels" / "im1.png").unlink()
    with pytest.raises(InvalidInputError, match=r"1 of 3 images .* im1\.png"):
        InstanceDataset(root)

    root = write_dataset(tmp_path / "shape", n=2)
    Image.fromarray(np.zeros((10, 12), np.uint16)).save(root / "labels" / "im0.png")
    with pytest.raises(InvalidInputError, match="must match"):
        InstanceDataset(root)

    root = tmp_path / "float"
    root.mkdir()
    img, lab = disk_image(32)
    tifffile.imwrite(root / "x.tif", img)
    tifffile.imwrite(root / "x_labels.tif", lab.astype(np.float32))
    with pytest.raises(InvalidInputError, match="integers"):
        InstanceDataset(root)

    root = write_dataset(tmp_path / "ids", n=2)
    with pytest.raises(InvalidInputError, match="not in the dataset"):
        InstanceDataset(root, ids=["im0", "zzz"])


def test_dataset_empty_labels_skipped_or_error(tmp_path):
    root = write_dataset(tmp_path / "d", n=3)
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(root / "labels" / "im2.png")
    with pytest.warns(UserWarning, match="im2.png"):
        ds = InstanceDataset(root)
    assert ds.ids == ["im0", "im1"]
    for i in range(2):
        Image.fromarray(np.zeros((64, 64), np.uint16)).save(root / "labels" / f"im{i}.png")
    with pytest.raises(InvalidInputError, match="empty"):
        InstanceDataset(root)


def test_random_samples_are_seeded_and_aligned(tmp_path):
    root = write_dataset(tmp_path / "d", n=2, size=96)
    ds = InstanceDataset(root, img_size=64, low_res_size=16, augment=AugmentConfig())
    a = ds.sample(1, np.random.default_rng(5))
    b = ds.sample(1, np.random.default_rng(5))
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
    # geometric augmentation keeps image and labels together
    plain = InstanceDataset(root, img_size=64, augment=AugmentConfig.none())
    for seed in range(6):
        s = plain.sample(0, np.random.default_rng(seed), crop=True)
        fg = s.labels > 0
        if fg.any() and (~fg).any():
            valid = torch.zeros_like(fg)
            valid[: s.input_size[0], : s.input_size[1]] = True
            assert s.image[0][fg].mean() > s.image[0][~fg & valid].mean()


def test_augment_geometry_keeps_pairs():
    img = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    lab = img[..., 0].astype(np.int64)
    for seed in range(8):
        a, b = augment_geometry(img, lab, np.random.default_rng(seed), AugmentConfig())
        assert np.array_equal(a[..., 0].astype(np.int64), b)
    pixels = np.full((8, 8, 3), 100.0, np.float32)
    out = augment_intensity(pixels, np.random.default_rng(0), AugmentConfig.none())
    np.testing.assert_allclose(out, pixels, atol=1e-3)


def test_split_ids_deterministic():
    ids = [f"id{i:03d}" for i in range(40)]
    train_a, val_a = split_ids(ids, 0.15, seed=3)
    train_b, val_b = split_ids(list(reversed(ids)), 0.15, seed=3)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 6 and not set(train_a) & set(val_a)
    assert sorted(train_a + val_a) == ids
    assert split_ids(ids, 0.15, seed=4)[1] != val_a
    assert len(split_ids(["a", "b"], 0.1)[1]) == 1


def test_load_ids(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"train": ["x"], "val": ["y", "z"]}))
    assert load_ids(tmp_path / "a.json") == (["x"], ["y", "z"])
    (tmp_path / "b.txt").write_text("y\nz\n")
    assert load_ids(tmp_path / "b.txt") == (None, ["y", "z"])


# ------------------------------------------------------------------------ prompts


def _masks(seed=0, k=5, size=64):
    _, lab = disk_image(size, n=k, seed=seed)
    lab = torch.from_numpy(lab.astype(np.int64))
    ids = sample_instances(lab, 10)
    return lab.unsqueeze(0) == ids.view(-1, 1, 1)


def test_first_points_inside_masks():
    masks = _masks()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        coords, valid = sample_points_in_masks(masks, gen)
        assert valid.all()
        x, y = coords[:, 0].long(), coords[:, 1].long()
        assert masks[torch.arange(len(masks)), y, x].all()
    empty = torch.zeros(2, 8, 8, dtype=torch.bool)
    assert not sample_points_in_masks(empty)[1].any()


def test_sample_instances_min_area_and_count():
    lab = torch.zeros(10, 10, dtype=torch.int64)
    lab[0, 0] = 1
    lab[2:6, 2:6] = 2
    lab[7:10, 7:10] = 3
    assert sample_instances(lab, 5, min_area=4).tolist() == [2, 3]
    gen = torch.Generator().manual_seed(0)
    assert len(sample_instances(lab, 2, gen)) == 2


def test_boxes_and_jitter():
    masks = torch.zeros(2, 50, 60, dtype=torch.bool)
    masks[0, 10:20, 5:35] = True
    masks[1, 40:50, 50:60] = True
    boxes = boxes_from_masks(masks)
    assert boxes.tolist() == [[5, 10, 34, 19], [50, 40, 59, 49]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        noisy = jitter_boxes(boxes, (50, 60), gen)
        assert (noisy[:, 2] >= noisy[:, 0]).all() and (noisy[:, 3] >= noisy[:, 1]).all()
        assert noisy[:, 0::2].min() >= 0 and noisy[:, 0::2].max() <= 59
        # noise std is 10% of the side: 6 sigma is 18 px in x and 6 px in y for box 0
        assert (noisy[0] - boxes[0]).abs().le(torch.tensor([18.0, 6.0, 18.0, 6.0])).all()


@pytest.mark.parametrize("mode", ["uniform", "center", "interior"])
def test_correction_points_in_error_region(mode):
    gt = torch.zeros(3, 40, 40, dtype=torch.bool)
    gt[:, 10:30, 10:30] = True
    pred = gt.clone()
    pred[0, 10:30, 10:20] = False  # object 0: a false-negative half
    pred[1, 0:40, 30:40] = True  # object 1: a large false-positive band
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        coords, labels = correction_points(pred, gt, mode, gen, rng)
        x, y = coords.long().unbind(1)
        assert labels.tolist() == [1, 0, -1]
        assert gt[0, y[0], x[0]] and not pred[0, y[0], x[0]]
        assert pred[1, y[1], x[1]] and not gt[1, y[1], x[1]]
    if mode == "center":
        # the innermost pixel of the 20x10 false-negative block, first in raster order
        assert coords[0].tolist() == [14.0, 14.0]


def test_correction_points_pick_larger_region():
    gt = torch.zeros(1, 30, 30, dtype=torch.bool)
    gt[0, 5:25, 5:25] = True
    pred = gt.clone()
    pred[0, 5:7, 5:7] = False  # 4 px false negative
    pred[0, 26:30, 0:30] = True  # 120 px false positive
    coords, labels = correction_points(pred, gt, "center")
    assert labels.tolist() == [0] and coords[0, 1] >= 26


def test_innermost_points():
    m = np.zeros((2, 20, 20), bool)
    m[0, 2:9, 3:10] = True  # 7 x 7 block: innermost pixel (5, 6)
    assert innermost_points(m).tolist() == [[5, 6], [-1, -1]]


# ------------------------------------------------------------------------- losses


def test_focal_and_dice_known_values():
    logits = torch.zeros(1, 2, 2)
    ones, zeros = torch.ones(1, 2, 2), torch.zeros(1, 2, 2)
    ln2 = math.log(2)
    assert focal_loss(logits, ones).item() == pytest.approx(0.25 * 0.25 * ln2, rel=1e-5)
    assert focal_loss(logits, zeros).item() == pytest.approx(0.75 * 0.25 * ln2, rel=1e-5)
    # confident and right -> ~0; confident and wrong -> large
    assert focal_loss(torch.full((1, 2, 2), 10.0), ones).item() < 1e-6
    assert focal_loss(torch.full((1, 2, 2), -10.0), ones).item() > 1.0
    half = torch.zeros(1, 4, 4)
    half[0, :2] = 1
    # p = 0.5 everywhere: 1 - (2 * 4 + 1) / (8 + 8 + 1)
    assert dice_loss(torch.zeros(1, 4, 4), half).item() == pytest.approx(1 - 9 / 17, rel=1e-6)
    assert dice_loss(half * 40 - 20, half).item() < 1e-6
    assert logits_mask_iou(half * 2 - 1, half).item() == 1.0
    assert logits_mask_iou(torch.ones(1, 4, 4), half).item() == 0.5


def test_sam_loss_best_of_three():
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    good = target * 40 - 20
    logits = torch.stack([torch.full((2, 8, 8), -20.0), good, torch.full((2, 8, 8), 20.0)], 1)
    logits[1] = logits[1, [2, 0, 1]]  # object 1: the good mask is output 2
    iou_pred = torch.tensor([[0.0, 1.0, 0.25], [0.0, 0.0, 0.0]], requires_grad=True)
    logits.requires_grad_(True)
    out = sam_loss(logits, iou_pred, target)
    assert out.best.tolist() == [1, 2]
    assert out.iou.tolist() == [1.0, 1.0]
    # object 0's IoU predictions are exact (actual IoUs 0, 1, 0.25): its MSE is 0;
    # object 1 predicts 0 for outputs whose IoUs are 0.25 (all on), 0 (all off), 1
    assert out.iou_mse[0].item() == pytest.approx(0.0, abs=1e-7)
    assert out.iou_mse[1].item() == pytest.approx((0.25**2 + 0 + 1) / 3, rel=1e-5)
    out.total.backward()
    # only the selected mask gets a mask-loss gradient
    g = logits.grad.abs().sum((2, 3))
    assert g[0, 1] == 0 or g[0, 1] < 1e-6  # saturated logits
    assert (iou_pred.grad[0] == 0).all() and (iou_pred.grad[1, [0, 2]] < 0).all()


def test_soft_targets_area_average():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, :2, :3] = True
    t = soft_targets(m, 4)
    assert t.shape == (1, 4, 4)
    assert t[0, 0].tolist() == [1.0, 0.5, 0.0, 0.0]
    with pytest.raises(InvalidInputError):
        soft_targets(m, 3)


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 99) == pytest.approx(1e-4, rel=1e-2)
    cfg.schedule = "step"
    assert learning_rate(cfg, 95) == pytest.approx(1e-5)


# ------------------------------------------------------------------------- loop


def _config(tmp_path, tiny_sam_config, **kw) -> TrainConfig:
    return run_config(tmp_path, tiny_sam_config, **kw)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_decreases_loss(tmp_path, tiny_sam_config):
    write_dataset(tmp_path / "data", n=6, size=80)
    cfg = _config(tmp_path, tiny_sam_config, val_ids=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = train(cfg)
    assert path.is_file() and (path.parent / "last_state.pt").is_file()
    losses = _losses(path.parent)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_resume_gives_same_weights(tmp_path, tiny_sam_config):
    from safetensors.torch import load_file

    write_dataset(tmp_path / "data", n=4, size=64)
    (tmp_path / "val.json").write_text(json.dumps(["im3"]))
    kw = dict(steps=6, val_ids=str(tmp_path / "val.json"), checkpoint_every=3, rounds=2)
    one = train(_config(tmp_path, tiny_sam_config, output_dir=str(tmp_path / "a"), **kw))
    # a run cancelled after 3 steps, then resumed
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    from napari_sam.errors import CancelledError

    cfg_b = _config(tmp_path, tiny_sam_config, output_dir=str(tmp_path / "b"), **kw)
    with pytest.raises(CancelledError):
        train(cfg_b, cancel=cancel)
    assert json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3
    two = train(cfg_b)
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-4)


def test_focal_ramp_and_cli_arguments():
    import argparse

    from napari_sam.cli.train import add_train_arguments, config_from_args
    from napari_sam.training.config import setting_fields

    cfg = TrainConfig(focal_ramp_steps=10)
    assert cfg.loss_kwargs(0)["focal_weight"] == 0.0
    assert cfg.loss_kwargs(5)["focal_weight"] == pytest.approx(10.0)
    assert cfg.loss_kwargs(50)["focal_weight"] == 20.0
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["d", "--steps", "5", "--freeze-encoder", "--lr", "1e-4"])
    names = {f.name for _, f in setting_fields()}  # the flat settings of the nested config
    assert set(vars(args)) - names == {"device", "overwrite"}  # not training settings
    built = config_from_args(args)
    assert (built.data, built.steps, built.freeze_encoder, built.lr) == ("d", 5, True, 1e-4)


def test_object_windows_and_windowed_losses():
    from napari_sam.training.losses import object_windows

    t = torch.zeros(2, 32, 32)
    t[0, 10:14, 20:24] = 1  # 4 x 4 object centred at (11.5, 21.5)
    w = object_windows(t, 3.0, min_side=1)
    rows = torch.nonzero(w[0].any(1)).flatten()
    cols = torch.nonzero(w[0].any(0)).flatten()
    # 3 x its 4-pixel box about the centre: |i - 11.5| <= 6
    assert (rows.min().item(), rows.max().item()) == (6, 17)
    assert (cols.min().item(), cols.max().item()) == (16, 27)
    assert w[1].all()  # empty target: the whole map
    # errors outside the window do not count
    logits = t * 40 - 20
    logits[0, 0, 0] = 20.0  # a false positive far away
    full = focal_loss(logits, t, alpha=-1)[0]
    windowed = focal_loss(logits, t, alpha=-1, window=w)[0]
    assert full > 1e-3 and windowed < 1e-6
    assert dice_loss(logits, t, window=w)[0] < 1e-6 < dice_loss(logits, t)[0]
    out = sam_loss(logits[:, None], torch.ones(2, 1), t, window=w)
    assert out.iou[0] < 1.0  # IoU is over the whole map


def test_loss_window_schedule_and_cli():
    import argparse

    from napari_sam.cli.train import add_train_arguments, config_from_args

    cfg = TrainConfig(loss_window=3.0, loss_window_steps=10)
    assert cfg.loss_kwargs(0)["loss_window"] == 3.0
    assert cfg.loss_kwargs(10)["loss_window"] == 0.0
    assert cfg.loss_kwargs()["loss_window"] == 0.0  # validation: whole map
    grow = TrainConfig(loss_window=2.0, loss_window_steps=10, loss_window_end=32.0)
    assert grow.loss_kwargs(0)["loss_window"] == 2.0
    assert grow.loss_kwargs(5)["loss_window"] == pytest.approx(8.0)  # geometric
    assert grow.loss_kwargs(10)["loss_window"] == 0.0
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["d", "--loss-window", "3", "--loss-window-steps", "7", "--scale-range", "1", "3",
         "--cache-images"]
    )
    built = config_from_args(args)
    assert (built.loss_window, built.loss_window_steps) == (3.0, 7)
    assert tuple(built.scale_range) == (1.0, 3.0) and built.cache_images


def test_fine_tune_a_checkpoint_with_frozen_encoder(tmp_path, tiny_sam_config):
    """``init`` loads a checkpoint; ``freeze_encoder`` trains the prompt side only."""
    from safetensors.torch import load_file

    from napari_sam.models.build import build_sam
    from napari_sam.models.checkpoint import save_model

    write_dataset(tmp_path / "data", n=4, size=64)
    torch.manual_seed(3)
    start = save_model(build_sam(tiny_sam_config), tmp_path / "start.safetensors")
    cfg = _config(tmp_path, tiny_sam_config, steps=3, val_ids=None, init=str(start),
                  freeze_encoder=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(cfg)
    before, after = load_file(str(start)), load_file(str(out))
    assert before.keys() == after.keys()
    enc = [k for k in before if k.startswith("image_encoder.")]
    dec = [k for k in before if k.startswith("mask_decoder.")]
    assert enc and dec
    assert all(torch.equal(before[k], after[k]) for k in enc)  # frozen
    assert any(not torch.equal(before[k], after[k]) for k in dec)  # fine-tuned


# ------------------------------------------------------------------- issue 13: bad settings


def test_config_problems_and_train_refuses_before_writing(tmp_path):
    from napari_sam.training.config import config_problems

    assert config_problems(TrainConfig(data="d")) == []
    bad = TrainConfig(data="d", steps=-5, batch_size=0, lr=float("nan"), box_prob=1.5,
                      rounds=2, mask_only_rounds=2, seed=-1, scale_range=(2.0, 1.0))
    names = [name for name, _ in config_problems(bad)]
    assert names == ["steps", "batch_size", "seed", "lr", "box_prob", "mask_only_rounds",
                     "scale_range"]
    with pytest.raises(InvalidInputError, match=r"TrainConfig.steps must be an integer >= 1, "
                                                r"got -5 \(and 1 more\)"):
        train(TrainConfig(data=str(tmp_path), output_dir=str(tmp_path / "run"), steps=-5,
                          lr=float("nan")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("a.json", '{"val": 5}', '"val" must be a list of image ids'),
        ("a.json", "{not json", "invalid JSON"),
        ("a.txt", "[broken", "invalid JSON"),
        ("a.json", '{"val": ["x"], "tran": ["y"]}', "unknown list key"),
        ("a.json", "[[1, 2]]", "must be a list of image ids"),
        ("a.json", '"x"', "expected a list of ids"),
    ],
)
def test_load_ids_rejects_malformed_files(tmp_path, name, text, match):
    """Review D9/D11: {"val": 5} raised TypeError; broken JSON was read as a text list."""
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        load_ids(tmp_path / name)
    (tmp_path / "ok.json").write_text('[1, "b"]')
    assert load_ids(tmp_path / "ok.json") == (None, ["1", "b"])


@pytest.mark.parametrize("name", ["dsb2018.json", "dsb2018_val20.json"])
def test_load_ids_reads_the_repository_splits_with_their_notes(name):
    """The shipped split files carry "dataset"/"rule"/"seed" notes beside the id lists."""
    path = Path(__file__).resolve().parents[2] / "splits" / name
    train_ids, val_ids = load_ids(path)
    assert len(val_ids) >= 20 and all(isinstance(i, str) for i in val_ids)
    assert train_ids is None or not set(train_ids) & set(val_ids)


# ------------------------------------------------------------------- issue 14: logging


def test_progress_goes_to_the_training_logger_and_the_cli_shows_it(tmp_path, tiny_sam_config,
                                                                   caplog, capfd):
    """The library logs (logger napari_sam.training) instead of printing; the CLI still shows
    the same lines on stderr."""
    import logging

    from training_helpers import run_cli

    write_dataset(tmp_path / "data", n=2, size=64)
    with caplog.at_level(logging.INFO, logger="napari_sam.training"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_config(tmp_path, tiny_sam_config, steps=1, batch_size=1, rounds=1))
    assert "step 1/1 loss=" in caplog.text
    assert "step 1/1" not in capfd.readouterr().err  # nothing printed by the library
    (tmp_path / "model.json").write_text(json.dumps(tiny_sam_config.to_dict()))
    common = ["train", str(tmp_path / "data"), "--arch", str(tmp_path / "model.json"),
              "-o", str(tmp_path / "cli"), "--batch-size", "1", "--rounds", "1",
              "--num-threads", "1", "--log-every", "1"]
    first = run_cli(*common, "--steps", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "\nstep 1/1 loss=" in "\n" + first.stderr
    assert first.stdout.strip() == str(tmp_path / "cli" / "last.safetensors")
    again = run_cli(*common, "--steps", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming from step 1 ({tmp_path / 'cli' / 'last.safetensors'})" in again.stderr
    assert "\nstep 2/2 loss=" in again.stderr and "step 1/2" not in again.stderr
    over = run_cli(*common, "--steps", "1", "--overwrite", cwd=tmp_path)
    assert over.returncode == 0, over.stderr
    assert f"starting over in {tmp_path / 'cli'} (--overwrite: removed config.json" in over.stderr


# ------------------------------------------------------ issue 14: one owner of image files


def test_dataset_reads_images_as_the_cli_does_jpeg_and_palette_png(tmp_path):
    """Review (b)5 "reading images": training refused JPEGs the CLI accepts, and decoded
    palette PNGs to their palette indices instead of their colours."""
    from napari_sam.engine import io
    from napari_sam.engine.image import to_rgb_uint8

    img, lab = disk_image(48, seed=3)
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.stack([img, img // 2, 255 - img], -1)).save(root / "images" / "a.jpg")
    palette = Image.fromarray((img > 100).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 250, 40, 10] + [0] * 762)  # 0: black, 1: red
    palette.save(root / "images" / "b.png")
    # a palette label image keeps its indices as object ids
    label_png = Image.fromarray(lab.astype(np.uint8), mode="P")
    label_png.putpalette(list(range(256)) * 3)
    for name in ("a", "b"):
        label_png.save(root / "labels" / f"{name}.png")
    ds = InstanceDataset(root, img_size=64, low_res_size=16)
    assert ds.ids == ["a", "b"]
    for i, name in enumerate(("a.jpg", "b.png")):
        image, labels = ds.load(i)
        expected = to_rgb_uint8(io.read_image(root / "images" / name).data)
        np.testing.assert_array_equal(image, expected)
        np.testing.assert_array_equal(labels, lab)
    assert ds.load(1)[0][lab > 0].tolist()[0] == [250, 40, 10]  # the palette colour


def test_resume_refuses_a_damaged_checkpoint_with_advice(tmp_path, tiny_sam_config):
    """last.safetensors is read through models.checkpoint; a truncated one is a clear error."""
    from napari_sam.errors import CheckpointError

    write_dataset(tmp_path / "data", n=2, size=64)
    cfg = _config(tmp_path, tiny_sam_config, steps=1, batch_size=1, rounds=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = train(cfg)
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"Cannot resume from .*last.safetensors: "
                                              r"unreadable .*pass --overwrite"):
        train(_config(tmp_path, tiny_sam_config, steps=2, batch_size=1, rounds=1))


# ---------------------------------------------------------- issue 13 leftover: --device


def test_train_device_is_checked_before_anything_is_written(tmp_path, tiny_sam_config):
    """train accepted only 'cpu'; any torch device is accepted now, an unavailable or
    unknown one is a typed error that names it."""
    from napari_sam.training.trainer import training_device

    assert training_device(None) == torch.device("cpu")
    assert training_device("cpu") == torch.device("cpu")
    cfg = _config(tmp_path, tiny_sam_config, steps=1)
    for device, text in (("cuda:99", "device 'cuda:99' requested but"),
                         ("tpu", "device 'tpu'")):
        with pytest.raises(InvalidInputError, match=text):
            train(cfg, device=device)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_resumes_on_the_cpu(tmp_path, tiny_sam_config):
    write_dataset(tmp_path / "data", n=2, size=64)
    kw = dict(batch_size=1, rounds=2, aux_dense=0.5, val_ids=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_config(tmp_path, tiny_sam_config, steps=2, **kw), device="cuda")
        train(_config(tmp_path, tiny_sam_config, steps=3, **kw), device="cpu")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
