"""Options of the hand-run benchmarks that need no timing (benchmarks/*.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from napari_sam.models.build import MODEL_CONFIGS

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_everything_encoder_depth_for_vit_and_tinyvit():
    """``--encoder-depth`` on vit_t raised a TypeError (TinyViT has per-stage depths)."""
    shallower = _load("bench_everything").shallower_encoder
    tiny = shallower(MODEL_CONFIGS["vit_t"].encoder, 1)
    assert tiny.depths == (1, 1, 1, 1)
    assert shallower(MODEL_CONFIGS["vit_t"].encoder, 3).depths == (2, 2, 3, 2)
    vit = shallower(MODEL_CONFIGS["vit_b"].encoder, 2)
    assert (vit.depth, vit.global_attn_indexes) == (2, (1,))
    with pytest.raises(SystemExit, match="at least 1"):
        shallower(MODEL_CONFIGS["vit_b"].encoder, 0)
