"""napari_sam._files: the one atomic writer (label images, JSON, checkpoints)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from napari_sam import _files
from napari_sam.engine import io


@pytest.fixture
def umask_077():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_published_files_follow_the_umask_of_the_moment_they_are_written(tmp_path, umask_077):
    """Issue 14 item 4: engine/io read the umask once, at import, by flipping it process-wide."""
    assert _files.current_umask() == 0o077
    labels = io.write_labels(tmp_path / "a_labels.tif", np.ones((4, 4), np.uint32))
    assert _mode(labels) == 0o600
    os.umask(0o022)
    assert _files.current_umask() == 0o022
    assert _mode(io.write_json(tmp_path / "a.json", {"a": 1})) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_save_model_writes_through_the_same_atomic_writer(tmp_path, tiny_sam, umask_077,
                                                          monkeypatch):
    from napari_sam.models.checkpoint import load_state_dict, save_model

    path = save_model(tiny_sam, tmp_path / "m.safetensors")
    assert _mode(path) == 0o600 and load_state_dict(path)
    # a failed write leaves the old checkpoint and no temporary file
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny_sam, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_io_keeps_no_umask_state_of_its_own():
    assert not hasattr(io, "_UMASK") and io.atomic_path is _files.atomic_path
