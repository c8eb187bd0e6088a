"""Tests of napari_sam.training.config: the nested TrainConfig, its flat names and old files."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import pytest
from training_helpers import write_dataset

from napari_sam.errors import InvalidInputError
from napari_sam.training import TrainConfig, train
from napari_sam.training.config import (
    SECTIONS,
    DataConfig,
    OptimConfig,
    config_problems,
    setting_fields,
)

#: the keys of config.json as napari-sam wrote them before the settings were nested
OLD_CONFIG_KEYS = [
    "data", "output_dir", "model", "init", "val_ids", "train_ids", "steps", "batch_size",
    "instances_per_image", "rounds", "mask_only_rounds", "box_prob", "point_mode",
    "decoder_chunk", "lr", "weight_decay", "betas", "warmup_steps", "schedule", "min_lr_ratio",
    "grad_clip", "freeze_encoder", "focal_weight", "dice_weight", "iou_weight", "focal_alpha",
    "focal_gamma", "focal_ramp_steps", "loss_window", "loss_window_steps", "loss_window_end",
    "full_view_prob", "scale_range", "augment", "min_area", "seed", "checkpoint_every",
    "log_every", "val_every", "val_images", "num_threads", "cache_images", "aux_dense",
]
#: settings added since (issue 15: training the AIS head, the augmentation preset); an old
#: config.json lacks them
NEW_CONFIG_KEYS = ["head_only", "ais_head_hidden", "augment_preset"]


def test_flat_names_reach_their_section_and_sections_are_copied():
    cfg = TrainConfig(data="d", lr=1e-4, rounds=2, steps=7)
    assert (cfg.dataset.data, cfg.optim.lr, cfg.prompts.rounds, cfg.run.steps) == (
        "d", 1e-4, 2, 7)
    cfg.schedule = "step"
    assert cfg.optim.schedule == "step" and cfg.schedule == "step"
    optim = OptimConfig(lr=5e-3)
    built = TrainConfig(optim=optim, dataset=DataConfig(data="x"), warmup_steps=3)
    assert (built.lr, built.warmup_steps, optim.warmup_steps) == (5e-3, 3, 50)  # copied
    other = dataclasses.replace(built, steps=9)
    assert (other.steps, built.steps, other.lr) == (9, 1000, 5e-3)
    other.lr = 1.0
    assert built.lr == 5e-3  # replace() shares no section
    with pytest.raises(TypeError, match="unexpected keyword argument 'stpes'"):
        TrainConfig(stpes=3)
    with pytest.raises(AttributeError):
        _ = cfg.stpes


def test_flat_and_nested_dicts_round_trip(tiny_sam_config):
    cfg = TrainConfig(data="d", model=tiny_sam_config, lr=1e-4, scale_range=(1.0, 3.0),
                      train_ids=["a", "b"], aux_dense=0.5)
    flat, nested = cfg.to_dict(), cfg.to_nested_dict()
    assert sorted(flat) == sorted(OLD_CONFIG_KEYS + NEW_CONFIG_KEYS)  # the old keys stay
    assert set(nested) == set(SECTIONS) and nested["optim"]["lr"] == 1e-4
    for d in (flat, nested, json.loads(json.dumps(flat)), json.loads(json.dumps(nested))):
        back = TrainConfig.from_dict(d)
        assert json.loads(json.dumps(back.to_dict())) == json.loads(json.dumps(flat))
    with pytest.raises(InvalidInputError, match="unknown setting 'lrr'"):
        TrainConfig.from_dict({"lrr": 1})
    with pytest.raises(InvalidInputError, match="'optim' has no setting 'steps'"):
        TrainConfig.from_dict({"optim": {"steps": 1}})


def test_every_setting_documents_itself_and_its_range_is_checked():
    names = [f.name for _, f in setting_fields()]
    assert sorted(names) == sorted(OLD_CONFIG_KEYS + NEW_CONFIG_KEYS)
    for _, f in setting_fields():
        assert f.metadata["help"], f.name
        low, kind = f.metadata["min"], f.metadata["kind"]
        if low is None or kind not in (int, float):
            continue
        below = low - 1 if kind is int else (low if f.metadata["min_open"] else low - 0.5)
        problems = dict(config_problems(TrainConfig(data="d", **{f.name: below})))
        assert f.name in problems, f.name
        assert f.name not in dict(config_problems(TrainConfig(data="d", **{f.name: low + 1})))
    assert dict(config_problems(TrainConfig(data="d", schedule="linear")))["schedule"] == (
        "must be one of cosine, step, constant, got 'linear'")


def _cfg(tmp_path, tiny_sam_config, **kw) -> TrainConfig:
    base = dict(data=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
                model=tiny_sam_config, batch_size=1, instances_per_image=2, rounds=1,
                warmup_steps=1, log_every=1, seed=0, num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("layout", ["old_flat", "nested"])
def test_a_run_folder_with_an_old_flat_config_json_resumes(tmp_path, tiny_sam_config, caplog,
                                                           layout):
    """A run written before the settings were nested (flat config.json) still resumes."""
    write_dataset(tmp_path / "data", n=2, size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_cfg(tmp_path, tiny_sam_config, steps=1))
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    # rewrite it as the old code wrote it: flat keys in the old order
    old = {key: saved[key] for key in OLD_CONFIG_KEYS}
    assert set(saved) == set(old) | set(NEW_CONFIG_KEYS)
    text = old if layout == "old_flat" else TrainConfig.from_dict(old).to_nested_dict()
    (run / "config.json").write_text(json.dumps(text, indent=1))
    with caplog.at_level(logging.INFO, logger="napari_sam.training"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_cfg(tmp_path, tiny_sam_config, steps=2))
    assert "resuming from step 1" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # a changed setting is still refused against the old file
    (run / "config.json").write_text(json.dumps(old, indent=1))
    with pytest.raises(InvalidInputError, match=r"other settings \(lr: 0.0003 -> 0.001\)"):
        train(_cfg(tmp_path, tiny_sam_config, steps=3, lr=1e-3))
