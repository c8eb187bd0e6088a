"""The thread policy: fewer threads when other processes keep cores busy."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from napari_sam import Predictor
from napari_sam.engine import threads
from napari_sam.errors import InvalidInputError


@pytest.fixture
def torch_threads_2():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _fake_load(monkeypatch, busy: float, cores: int = 2) -> None:
    monkeypatch.setattr(threads._MONITOR, "available", True)
    monkeypatch.setattr(threads._MONITOR, "other_busy_cores", lambda: busy)
    monkeypatch.setattr(threads, "cpu_count", lambda: cores)


@pytest.mark.parametrize(
    ("busy", "cores", "limit", "expected"),
    [
        (0.0, 2, 2, 2),  # quiet: torch's count
        (0.1, 2, 2, 2),  # short bursts below the margin
        (1.0, 2, 2, 1),  # one core taken
        (0.6, 2, 2, 1),  # most of a core taken
        (2.0, 2, 2, 1),  # everything taken: still one thread
        (1.0, 8, 8, 7),
        (1.0, 8, 4, 4),  # never above the caller's limit
        (0.0, 8, 1, 1),
    ],
)
def test_choose_threads_leaves_busy_cores_alone(monkeypatch, busy, cores, limit, expected):
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    _fake_load(monkeypatch, busy, cores)
    assert threads.choose_threads(limit) == expected


def test_environment_variable_fixes_the_count(monkeypatch):
    _fake_load(monkeypatch, 1.0)
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert threads.choose_threads(2) == 3
    monkeypatch.setenv(threads.ENV_VAR, "auto")
    assert threads.choose_threads(2) == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_environment_value_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(threads.ENV_VAR, value)
    with pytest.raises(InvalidInputError, match=threads.ENV_VAR):
        threads.choose_threads(2)


def test_compute_threads_restores_the_count(monkeypatch, torch_threads_2):
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    _fake_load(monkeypatch, 1.0)
    with threads.compute_threads() as n:
        assert n == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_predictor_encodes_and_decodes_on_the_free_cores(monkeypatch, torch_threads_2, tiny_sam):
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    seen = []
    hook = lambda *_: seen.append(torch.get_num_threads())  # noqa: E731
    tiny_sam.image_encoder.register_forward_hook(hook)
    tiny_sam.prompt_encoder.register_forward_hook(hook)
    predictor = Predictor(tiny_sam)
    image = np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)

    _fake_load(monkeypatch, 1.0)
    predictor.set_image(image)
    predictor.predict(points=np.array([[30, 40]]), labels=np.array([1]))
    assert seen == [1, 1]

    _fake_load(monkeypatch, 0.0)
    predictor.predict(points=np.array([[30, 40]]), labels=np.array([1]))
    assert seen[-1] == 2
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not threads._MONITOR.available or threads.cpu_count() != 2,
                    reason="needs /proc and exactly 2 cores")
def test_a_real_busy_process_is_seen(monkeypatch):
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    threads.warm_up()
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        while threads._MONITOR.other_busy_cores() < 0.7 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threads.choose_threads(2) == 1
    finally:
        load.kill()
        load.wait()
