"""Training checkpoints are written atomically (napari_sam._files.atomic_path)."""

from __future__ import annotations

import pytest
import torch

from napari_sam.training import run_folder


class DiskFull(OSError):
    pass


def _failing_save(obj, f, *args, **kwargs):
    """torch.save that writes part of a file, then fails (a full disk, a kill)."""
    with open(f, "wb") as out:
        out.write(b"PK\x03\x04 half a checkpoint")
    raise DiskFull("No space left on device")


def _state(step: int) -> dict:
    return {"step": step, "best": 0.5, "optimizer": {"state": {}, "param_groups": []}}


@pytest.mark.parametrize("write", ["torch", "state"])
def test_failed_checkpoint_write_keeps_the_previous_file_and_leaves_no_temp(
        tmp_path, monkeypatch, write):
    """A write that fails half-way (the old code left ``<name>.tmp`` behind)."""
    path = tmp_path / ("head.pt" if write == "torch" else "last_state.pt")

    def save(step):
        if write == "torch":
            run_folder.save_torch(torch.nn.Conv2d(2, 4, 1).state_dict(), path)
        else:
            run_folder.save_state(_state(step), path)

    save(3)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(DiskFull):
        save(4)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_checkpoint_files_round_trip_with_normal_permissions(tmp_path):
    head = torch.nn.Conv2d(2, 4, 1)
    run_folder.save_torch(head.state_dict(), tmp_path / "head.pt")
    saved = torch.load(tmp_path / "head.pt", weights_only=True)
    assert torch.equal(saved["weight"], head.weight)
    run_folder.save_state(_state(7), tmp_path / "last_state.pt")
    assert run_folder.load_state(tmp_path / "last_state.pt")["step"] == 7
    # atomic_path publishes with 0o666 less the umask, like a plainly created file
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert (tmp_path / "last_state.pt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
