"""Training the AIS head (issue 15): ``--head-only``, ``--aux-dense`` with the head inside the
model, models with and without a head, resume (also of runs that kept ``aux_head.pt``)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import run_cli, write_dataset

from napari_sam.errors import CancelledError, InvalidInputError
from napari_sam.models.checkpoint import (
    CONFIG_METADATA_KEY,
    model_from_checkpoint,
    read_metadata,
    save_model,
)
from napari_sam.models.zoo import load_model
from napari_sam.training import TrainConfig, train
from reference_utils import build_random_sam

HEAD = "ais_head."


def _init_file(tmp_path: Path, config, name: str = "init.safetensors") -> Path:
    """A seeded random tiny model saved as a checkpoint (a user's ``--model FILE``)."""
    return save_model(build_random_sam(config, seed=1), tmp_path / name)


def _cfg(tmp_path: Path, init: Path, out: str = "run", **kw) -> TrainConfig:
    base = dict(data=str(tmp_path / "data"), output_dir=str(tmp_path / out), init=str(init),
                steps=3, batch_size=2, instances_per_image=2, rounds=1, lr=1e-2,
                warmup_steps=0, log_every=1, checkpoint_every=1000, seed=0, num_threads=1,
                ais_head_hidden=16)
    base.update(kw)
    return TrainConfig(**base)


def _train(config: TrainConfig, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(config, **kw)


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    head = {k: v for k, v in state.items() if k.startswith(HEAD)}
    return head, {k: v for k, v in state.items() if not k.startswith(HEAD)}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"changed: {different[:5]}"


@pytest.mark.parametrize("with_head", [False, True], ids=["headless", "has_head"])
def test_head_only_changes_only_the_ais_head(tmp_path, tiny_sam_config, with_head):
    """``head_only``: every tensor but ``ais_head.*`` is bit-identical to the start model; the
    saved file loads with its head (added when the start model had none)."""
    write_dataset(tmp_path / "data", n=3, size=64)
    cfg = tiny_sam_config if not with_head else dataclasses.replace(tiny_sam_config,
                                                                     ais_head_hidden=8)
    init = _init_file(tmp_path, cfg)
    before_head, before_rest = _split(load_file(str(init)))
    assert bool(before_head) == with_head
    path = _train(_cfg(tmp_path, init, head_only=True))
    after_head, after_rest = _split(load_file(str(path)))
    _assert_identical(before_rest, after_rest)
    assert after_head, "no ais_head tensors in the trained model"
    if with_head:  # the model's own head was trained (width 8, not ais_head_hidden=16)
        assert set(after_head) == set(before_head)
        assert all(not torch.equal(before_head[k], after_head[k]) for k in after_head
                   if k.endswith("weight"))
    for model in (load_model(path), model_from_checkpoint(path)):
        assert model.ais_head is not None
        assert model.config.ais_head_hidden == (8 if with_head else 16)
        maps = model.ais_head(model.image_encoder(torch.zeros(1, 3, 128, 128)))
        assert maps.shape == (1, 4, 32, 32)
    log = [json.loads(x) for x in (path.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] == r["aux_dense"] for r in log)  # the dense loss is the only loss
    assert not (path.parent / "aux_head.pt").exists()


def test_head_only_keeps_the_batch_norm_statistics_of_a_tiny_vit(tmp_path):
    """TinyViT encoders have BatchNorm: head-only runs them in eval mode, so their running
    statistics (saved buffers) stay bit-identical too."""
    from napari_sam.models.build import SamConfig, TinyViTEncoderConfig

    config = SamConfig(TinyViTEncoderConfig(img_size=128, embed_dims=(16, 32, 48, 64),
                                            depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                                            window_sizes=(7, 7, 7, 7)),
                       prompt_embed_dim=64, decoder_mlp_dim=64, iou_head_hidden_dim=32)
    write_dataset(tmp_path / "data", n=2, size=64)
    init = _init_file(tmp_path, config)
    before = load_file(str(init))
    assert any(k.endswith("running_mean") for k in before)
    path = _train(_cfg(tmp_path, init, head_only=True, steps=2))
    head, rest = _split(load_file(str(path)))
    assert head
    _assert_identical(before, rest)


def test_head_only_validates_the_dense_loss_and_keeps_the_best_head(tmp_path, tiny_sam_config):
    """``--val-every`` in head-only mode scores the head (dense loss on whole validation
    images); best.safetensors is the model with the head of the lowest loss."""
    write_dataset(tmp_path / "data", n=4, size=64)
    (tmp_path / "ids.json").write_text(json.dumps({"val": ["im3"]}))
    init = _init_file(tmp_path, tiny_sam_config)
    path = _train(_cfg(tmp_path, init, head_only=True, val_every=1,
                       val_ids=str(tmp_path / "ids.json")))
    log = [json.loads(x) for x in (path.parent / "log.jsonl").read_text().splitlines()]
    val = [r["val_aux_dense"] for r in log]
    assert len(val) == 3 and "val_iou_mean" not in log[0]
    best_step = 1 + val.index(min(val))
    best = path.parent / "best.safetensors"
    assert read_metadata(best)["step"] == str(best_step)
    head, rest = _split(load_file(str(best)))
    assert head
    _assert_identical(_split(load_file(str(init)))[1], rest)


def test_head_only_resume_equals_an_uninterrupted_run(tmp_path, tiny_sam_config):
    write_dataset(tmp_path / "data", n=3, size=64)
    init = _init_file(tmp_path, tiny_sam_config)
    whole = _train(_cfg(tmp_path, init, "a", head_only=True, steps=4, checkpoint_every=2))
    calls: list[int] = []
    cfg_b = _cfg(tmp_path, init, "b", head_only=True, steps=4, checkpoint_every=2)
    with pytest.raises(CancelledError):
        _train(cfg_b, cancel=lambda: calls.append(1) or len(calls) > 3)
    resumed = _train(cfg_b)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert set(a) == set(b) and any(k.startswith(HEAD) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_aux_dense_trains_everything_and_saves_the_head_inside(tmp_path, tiny_sam_config):
    write_dataset(tmp_path / "data", n=3, size=64)
    init = _init_file(tmp_path, tiny_sam_config)
    path = _train(_cfg(tmp_path, init, aux_dense=1.0))
    head, rest = _split(load_file(str(path)))
    assert head and not (path.parent / "aux_head.pt").exists()
    _, before = _split(load_file(str(init)))
    assert not torch.equal(rest["image_encoder.patch_embed.proj.weight"],
                           before["image_encoder.patch_embed.proj.weight"])
    assert load_model(path).ais_head is not None


def test_freeze_encoder_with_aux_dense_trains_decoder_and_head(tmp_path, tiny_sam_config):
    write_dataset(tmp_path / "data", n=3, size=64)
    init = _init_file(tmp_path, tiny_sam_config)
    path = _train(_cfg(tmp_path, init, aux_dense=1.0, freeze_encoder=True))
    before, after = load_file(str(init)), load_file(str(path))
    encoder = [k for k in before if k.startswith("image_encoder.")]
    _assert_identical({k: before[k] for k in encoder}, {k: after[k] for k in encoder})
    assert not torch.equal(before["mask_decoder.iou_token.weight"],
                           after["mask_decoder.iou_token.weight"])
    assert any(k.startswith(HEAD) for k in after)


def test_without_aux_dense_a_head_stays_and_none_is_added(tmp_path, tiny_sam_config):
    """A head-less (official-style) model trains into a head-less file; a model with a head
    keeps it bit-identical while the rest learns."""
    write_dataset(tmp_path / "data", n=3, size=64)
    plain = _init_file(tmp_path, tiny_sam_config, "plain.safetensors")
    path = _train(_cfg(tmp_path, plain, "p"))
    assert not any(k.startswith(HEAD) for k in load_file(str(path)))
    assert load_model(path).ais_head is None
    with_head = _init_file(tmp_path, dataclasses.replace(tiny_sam_config, ais_head_hidden=8),
                           "head.safetensors")
    path = _train(_cfg(tmp_path, with_head, "h"))
    before_head, before_rest = _split(load_file(str(with_head)))
    after_head, after_rest = _split(load_file(str(path)))
    _assert_identical(before_head, after_head)
    assert not torch.equal(before_rest["mask_decoder.iou_token.weight"],
                           after_rest["mask_decoder.iou_token.weight"])
    assert load_model(path).ais_head is not None


def test_a_run_that_kept_its_head_in_aux_head_pt_resumes(tmp_path, tiny_sam_config, caplog):
    """Runs written before the head lived in the model (``aux_head.pt`` beside a head-less
    ``last.safetensors``) resume with their head, which then moves into the model file."""
    write_dataset(tmp_path / "data", n=3, size=64)
    init = _init_file(tmp_path, tiny_sam_config)
    whole = _train(_cfg(tmp_path, init, "a", aux_dense=1.0, steps=4, checkpoint_every=2))
    cfg_b = _cfg(tmp_path, init, "b", aux_dense=1.0, steps=4, checkpoint_every=2)
    calls: list[int] = []
    with pytest.raises(CancelledError):
        _train(cfg_b, cancel=lambda: calls.append(1) or len(calls) > 3)
    run = tmp_path / "b"
    # rewrite the step-2 checkpoint as the old code wrote it
    state = load_file(str(run / "last.safetensors"))
    meta = read_metadata(run / "last.safetensors")
    config = json.loads(meta[CONFIG_METADATA_KEY])
    assert config.pop("ais_head_hidden") == 16
    meta[CONFIG_METADATA_KEY] = json.dumps(config)
    head, rest = _split(state)
    torch.save({k[len(HEAD):]: v for k, v in head.items()}, run / "aux_head.pt")
    save_file(rest, str(run / "last.safetensors"), metadata=meta)
    resumed = _train(cfg_b)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert set(a) == set(b) and any(k.startswith(HEAD) for k in b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert not (run / "aux_head.pt").exists()  # read once; the head is in last.* now


def test_bad_head_settings_are_typed_errors(tmp_path, tiny_sam_config):
    write_dataset(tmp_path / "data", n=2, size=64)
    init = _init_file(tmp_path, tiny_sam_config)
    with pytest.raises(InvalidInputError, match="aux_dense weighs the dense loss.*--head-only"):
        _train(_cfg(tmp_path, init, head_only=True, aux_dense=1.0))
    with pytest.raises(InvalidInputError, match="ais_head_hidden must be an even number"):
        _train(_cfg(tmp_path, init, aux_dense=1.0, ais_head_hidden=15))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_head_only_adds_ais_to_a_model(tmp_path, tiny_sam_config):
    """``napari-sam train DATA -o RUN --model FILE --head-only`` as a user runs it; the result
    loads with its head. A contradictory option is exit code 2 with one clear line."""
    write_dataset(tmp_path / "data", n=3, size=64)
    init = _init_file(tmp_path, tiny_sam_config)
    common = ["train", str(tmp_path / "data"), "--model", str(init), "--steps", "2",
              "--batch-size", "1", "--num-threads", "1", "--ais-head-hidden", "16"]
    bad = run_cli(*common, "-o", str(tmp_path / "bad"), "--head-only", "--aux-dense", "1",
                  cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "--aux-dense weighs the dense loss" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = run_cli(*common, "-o", str(tmp_path / "ok"), "--head-only", "--freeze-encoder",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "aux_dense=" in ok.stderr
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["head_only"] is True and saved["ais_head_hidden"] == 16
    model = load_model(tmp_path / "ok" / "last.safetensors")
    assert model.ais_head is not None and model.config.ais_head_hidden == 16
    _, before = _split(load_file(str(init)))
    _, after = _split(load_file(str(tmp_path / "ok" / "last.safetensors")))
    _assert_identical(before, after)
