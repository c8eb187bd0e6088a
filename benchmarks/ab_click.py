"""Paired A/B of click latency: the working tree's predictor vs a git revision's.

    python benchmarks/ab_click.py REV [--repeats 80] [--real-embedding] [--boxes B] [--evict MB]

Loads ``src/napari_sam/engine/predictor.py`` as of ``REV`` (``git show``) next to
the installed one, gives both the same ViT-B random weights and the same
embedding (random, or with ``--real-embedding`` computed from the benchmark image),
and times one-point multimask clicks at 1200 x 1600 (with ``--boxes B``: one call
with B random 150-pixel boxes, single-mask output), the two versions alternating
(order swapped every round) in one process. On this noisy VM that is the way to see
changes of a few percent: both versions share the process, its memory layout and
the machine's load. Also reports how far their outputs differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_at(rev: str, relpath: str, name: str):
    """The module at ``src/napari_sam/<relpath>`` as of ``rev``, loaded as ``name``
    (None if it did not exist then)."""
    shown = subprocess.run(
        ["git", "show", f"{rev}:src/napari_sam/{relpath}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    if shown.returncode:
        return None
    path = Path(tempfile.mkdtemp()) / Path(relpath).name
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _module_at(rev: str):
    """``engine/predictor.py`` as of ``rev``, importing ``models/kernels.py`` as of ``rev``
    too (the one module it imports whose interface changes with it)."""
    import napari_sam.models as models

    current = sys.modules.get("napari_sam.models.kernels")
    old_kernels = _load_at(rev, "models/kernels.py", "napari_sam.models._kernels_at_rev")
    try:
        if old_kernels is not None:
            sys.modules["napari_sam.models.kernels"] = old_kernels
            models.kernels = old_kernels
        return _load_at(rev, "engine/predictor.py", "napari_sam.engine._predictor_at_rev")
    finally:
        if current is not None:
            sys.modules["napari_sam.models.kernels"] = current
            models.kernels = current


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev")
    parser.add_argument("--repeats", type=int, default=80)
    parser.add_argument("--real-embedding", action="store_true")
    parser.add_argument("--boxes", type=int, default=0, help="B boxes in one call instead")
    parser.add_argument("--evict", type=int, default=0, metavar="MB",
                        help="write MB megabytes before each timed call (other work evicting "
                             "the caches, as the reference's clicks do in bench_click.py)")
    args = parser.parse_args(argv)
    other_work = torch.empty(args.evict * 2**18)

    import napari_sam.engine.predictor as current
    from napari_sam.models.build import MODEL_CONFIGS, build_sam

    old = _module_at(args.rev)
    torch.manual_seed(0)
    model = build_sam(MODEL_CONFIGS["vit_b"]).eval()
    shape = (1200, 1600)
    features = torch.randn(1, 256, 64, 64)
    if args.real_embedding:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_click import _image

        first = current.Predictor(model)
        first.set_image(_image(shape))
        features = first.features
    preds = {}
    for name, module in ((args.rev, old), ("working tree", current)):
        pred = module.Predictor(model)
        pred.set_embedding(features, shape, pred.transform.input_size(shape))
        preds[name] = pred
    prompt = {"points": np.array([[480.0, 880.0]]), "labels": np.array([1])}
    if args.boxes:
        rng = np.random.default_rng(0)
        corner = rng.uniform((0, 0), (shape[0] - 150, shape[1] - 150), (args.boxes, 2))
        prompt = {"box": np.concatenate([corner, corner + 150], 1), "multimask": False}
    for _ in range(5):
        for pred in preds.values():
            pred.predict(**prompt)
    a, b = (pred.predict(**prompt) for pred in preds.values())
    span = float(a.logits.max() - a.logits.min())
    print(f"max |logit diff| / range {np.abs(a.logits - b.logits).max() / span:.1e}; "
          f"mask pixels equal {(a.masks == b.masks).mean():.7f}")
    times: dict[str, list[float]] = {name: [] for name in preds}
    for i in range(args.repeats):
        for name in list(preds) if i % 2 else list(preds)[::-1]:
            other_work.fill_(1.0)
            t0 = time.perf_counter()
            preds[name].predict(**prompt)
            times[name].append(time.perf_counter() - t0)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1e3:.2f} ms, "
              f"min {min(values) * 1e3:.2f} ms")
    old_med, new_med = (statistics.median(v) for v in times.values())
    print(f"working tree / {args.rev} (median): {new_med / old_med:.3f}")


if __name__ == "__main__":
    main()
