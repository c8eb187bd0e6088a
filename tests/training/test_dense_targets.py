"""Dense auxiliary supervision (napari_sam.training.dense_targets, ``--aux-dense``)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import run_cli, run_config, write_dataset

from napari_sam.models.ais_head import AisHead
from napari_sam.training import TrainConfig, train
from napari_sam.training.dense_targets import (
    DenseHead,
    dense_loss,
    dense_targets,
    dense_targets_batch,
    valid_mask,
)


def _two_touching_squares_and_a_dot() -> np.ndarray:
    """16 x 16 labels: 5 x 5 squares 1 (rows 2-6, cols 2-6) and 2 (cols 7-11), 3 at (12, 12)."""
    lab = np.zeros((16, 16), np.int64)
    lab[2:7, 2:7] = 1
    lab[2:7, 7:12] = 2
    lab[12, 12] = 3
    return lab


def test_targets_of_hand_made_objects():
    lab = _two_touching_squares_and_a_dot()
    t = dense_targets(lab, 16).numpy()  # S == L: no pooling
    assert t.shape == (4, 16, 16) and t.dtype == np.float32
    fg, boundary, centre, bdist = t
    np.testing.assert_array_equal(fg, lab > 0)
    # boundary: the ring of each square (including the shared edge) and the dot
    ring = np.zeros((5, 5), bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    np.testing.assert_array_equal(boundary[2:7, 2:7], ring)
    np.testing.assert_array_equal(boundary[2:7, 7:12], ring)
    assert boundary[12, 12] == 1 and boundary.sum() == 2 * 16 + 1
    # boundary distance: 1/3 on the ring, 2/3 inside it, 1 at the centre; the shared edge
    # counts as each square's own boundary
    for c0 in (2, 7):
        sq = bdist[2:7, c0 : c0 + 5]
        assert sq[2, 2] == pytest.approx(1.0)
        assert sq[ring] == pytest.approx(np.full(16, 1 / 3))
        assert sq[1:4, 1:4][[0, 0, 2, 2], [0, 2, 0, 2]] == pytest.approx(np.full(4, 2 / 3))
    # centre proximity: 1 at the innermost pixel, 0 at the farthest corners
    for c0 in (2, 7):
        sq = centre[2:7, c0 : c0 + 5]
        assert sq[2, 2] == pytest.approx(1.0)
        assert sq[[0, 0, 4, 4], [0, 4, 0, 4]] == pytest.approx(np.zeros(4), abs=1e-6)
        assert sq[0, 2] == pytest.approx(1 - 2 / math.sqrt(8))
    assert centre[12, 12] == 1 and bdist[12, 12] == 1  # a one-pixel object
    # nothing outside objects
    assert not t[:, lab == 0].any()


def test_targets_are_area_averaged_to_the_low_res_grid():
    lab = _two_touching_squares_and_a_dot()
    full = dense_targets(lab, 16)
    low = dense_targets(torch.from_numpy(lab), 8)  # a torch tensor works too
    assert low.shape == (4, 8, 8)
    torch.testing.assert_close(low, full.reshape(4, 8, 2, 8, 2).mean(dim=(2, 4)))
    assert float(low.min()) >= 0 and float(low.max()) <= 1
    assert dense_targets(np.zeros((16, 16), np.int64), 8).abs().sum() == 0  # no objects


def test_valid_mask_and_batch():
    m = valid_mask((10, 4), img_size=16, low_res_size=8)  # cell centres at 1, 3, 5, ...
    expected = torch.zeros(8, 8)
    expected[:5, :2] = 1  # rows 0-9 and cols 0-3 of the 16 px frame
    torch.testing.assert_close(m, expected)
    lab = torch.from_numpy(_two_touching_squares_and_a_dot())
    targets, valid = dense_targets_batch([lab, lab], [(16, 16), (10, 4)], 8)
    assert targets.shape == (2, 4, 8, 8) and valid.shape == (2, 1, 8, 8)
    assert valid[0].all() and valid[1].sum() == 10


def test_loss_ignores_padding_and_rewards_the_target():
    lab = torch.from_numpy(_two_touching_squares_and_a_dot())
    targets, _ = dense_targets_batch([lab], [(16, 16)], 16)
    binary = (targets > 0.5).float()
    good = dense_loss(binary * 20 - 10, binary)
    bad = dense_loss(10 - binary * 20, binary)
    assert good < 0.05 < 1.0 < bad
    valid = torch.zeros(1, 1, 16, 16)
    valid[..., :8, :] = 1
    logits = binary * 20 - 10
    noisy = logits.clone()
    noisy[..., 8:, :] = 10.0  # wrong, but in the padding
    clean = float(dense_loss(logits, binary, valid))
    assert float(dense_loss(noisy, binary, valid)) == pytest.approx(clean)


def test_head_overfits_one_embedding():
    """The light head can fit the targets of one image from a fixed embedding (seconds)."""
    torch.manual_seed(0)
    lab = torch.from_numpy(_two_touching_squares_and_a_dot())
    targets, valid = dense_targets_batch([lab], [(16, 16)], 16)
    emb = torch.randn(1, 32, 4, 4)
    head = AisHead(32, hidden=32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = dense_loss(head(emb), targets, valid)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------- training loop


def _cfg(tmp_path: Path, tiny_sam_config, **kw) -> TrainConfig:
    base = dict(rounds=1, lr=2e-3, aux_dense=1.0)
    base.update(kw)
    return run_config(tmp_path, tiny_sam_config, **base)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_the_dense_head_is_the_ais_head():
    """One definition: the training's old name is the model's AIS head class."""
    assert DenseHead is AisHead


def test_training_with_aux_dense_learns_and_saves_the_head_in_the_model(tmp_path,
                                                                       tiny_sam_config):
    import dataclasses

    from safetensors.torch import load_file

    from napari_sam.models.build import build_sam
    from napari_sam.models.checkpoint import model_from_checkpoint

    write_dataset(tmp_path / "data", n=4, size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = train(_cfg(tmp_path, tiny_sam_config))
    aux = [r["aux_dense"] for r in _log(path.parent)]
    assert len(aux) == 30 and all(math.isfinite(a) for a in aux)
    assert np.mean(aux[-5:]) < 0.8 * np.mean(aux[:5])
    # the head is the model's AIS head, saved inside its weights (nothing beside them)
    assert not (path.parent / "aux_head.pt").exists()
    with_head = dataclasses.replace(tiny_sam_config, ais_head_hidden=64)
    assert set(load_file(str(path))) == set(build_sam(with_head).state_dict())
    model = model_from_checkpoint(path)
    assert model.ais_head is not None and model.config.ais_head_hidden == 64


def test_aux_dense_resume_restores_the_head(tmp_path, tiny_sam_config):
    from safetensors.torch import load_file

    from napari_sam.errors import CancelledError

    write_dataset(tmp_path / "data", n=4, size=64)
    kw = dict(steps=4, checkpoint_every=2)
    one = train(_cfg(tmp_path, tiny_sam_config, output_dir=str(tmp_path / "a"), **kw))
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    cfg_b = _cfg(tmp_path, tiny_sam_config, output_dir=str(tmp_path / "b"), **kw)
    with pytest.raises(CancelledError):
        train(cfg_b, cancel=cancel)
    two = train(cfg_b)
    a, b = load_file(str(one)), load_file(str(two))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert any(k.startswith("ais_head.") for k in a)  # the head was compared with the rest
    la = [r["aux_dense"] for r in _log(tmp_path / "a")]
    lb = [r["aux_dense"] for r in _log(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_cli_aux_dense_option(tmp_path, tiny_sam_config):
    """``napari-sam train --aux-dense W`` trains the head; a negative weight is a clear error."""
    write_dataset(tmp_path / "data", n=3, size=64)
    (tmp_path / "model.json").write_text(json.dumps(tiny_sam_config.to_dict()))
    common = ["train", str(tmp_path / "data"), "--arch", str(tmp_path / "model.json"),
              "--steps", "2", "--batch-size", "1", "--rounds", "1", "--num-threads", "1"]
    bad = run_cli(*common, "-o", str(tmp_path / "bad"), "--aux-dense", "-1", cwd=tmp_path)
    assert bad.returncode == 1
    assert "aux_dense must be a finite weight >= 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = run_cli(*common, "-o", str(tmp_path / "ok"), "--aux-dense", "0.5", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    from napari_sam.models.zoo import load_model

    assert load_model(tmp_path / "ok" / "last.safetensors").ais_head is not None
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["aux_dense"] == 0.5
    assert "aux_dense=" in ok.stderr  # logged with the other metrics


@pytest.mark.parametrize("saved_aux", [1.0, 0.0])
def test_resuming_with_and_without_aux_dense_is_a_typed_error(tmp_path, tiny_sam_config,
                                                              saved_aux):
    """A run folder whose optimizer state has (or lacks) the aux head's parameter group, while
    its config.json says otherwise, was a raw ValueError from optimizer.load_state_dict."""
    from napari_sam.errors import InvalidInputError

    write_dataset(tmp_path / "data", n=2, size=64)
    kw = dict(steps=1, batch_size=1, aux_dense=saved_aux)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_cfg(tmp_path, tiny_sam_config, **kw))
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    other = 1.0 - saved_aux
    saved["aux_dense"] = other  # as if config.json and the checkpoint came from other runs
    (run / "config.json").write_text(json.dumps(saved))
    hint = "pass --aux-dense WEIGHT" if saved_aux else "leave --aux-dense out"
    with pytest.raises(InvalidInputError, match=f"Cannot resume the run in .*{hint}"):
        train(_cfg(tmp_path, tiny_sam_config, **{**kw, "steps": 2, "aux_dense": other}))
