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


@pytest.mark.parametrize("write", ["aux_head", "state"])
def test_failed_checkpoint_write_keeps_the_previous_file_and_leaves_no_temp(
        tmp_path, monkeypatch, write):
    head = torch.nn.Conv2d(2, 4, 1)
    path = tmp_path / ("aux_head.pt" if write == "aux_head" else "last_state.pt")

    def save():
        if write == "aux_head":
            run_folder.save_aux_head(head, path)
        else:
            run_folder.save_state({"step": 3, "best": 0.5, "optimizer": {"state": {}}}, path)

    save()
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(DiskFull):
        save()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_checkpoint_files_round_trip_with_normal_permissions(tmp_path):
    head = torch.nn.Conv2d(2, 4, 1)
    run_folder.save_aux_head(head, tmp_path / "aux_head.pt")
    copy = torch.nn.Conv2d(2, 4, 1)
    run_folder.load_aux_head(copy, tmp_path / "aux_head.pt")
    assert torch.equal(copy.weight, head.weight)
    run_folder.save_state({"step": 7, "best": -1.0, "optimizer": {"state": {}}},
                          tmp_path / "last_state.pt")
    assert run_folder.load_state(tmp_path / "last_state.pt")["step"] == 7
    # atomic_path publishes with 0o666 less the umask, like a plainly created file
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert (tmp_path / "last_state.pt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
