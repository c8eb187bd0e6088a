"""Paired A/B of everything-mode time: the working tree vs a git revision.

    python benchmarks/ab_everything.py REV [--rounds 6] [--model default] [--image PATH]

Checks ``REV`` out into a temporary git worktree and runs, alternately (order swapped every
round), one process per side that loads the model, embeds the image once, then times
``AutomaticMaskGenerator.generate`` on it with the model's recommended settings (best of 2
calls per process, embedding cached, so the figure is the mask generation). Both sides see
the machine's load in turn. Prints each side's median and the ratio, and checks that both
return the same number of masks. Default image: the bundled 520 x 696 nuclei sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import numpy as np
from napari_sam.engine.everything import AutomaticMaskGenerator
from napari_sam.engine.io import read_image
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.models.zoo import load_model
rgb = to_rgb_uint8(read_image(sys.argv[2]).data)
gen = AutomaticMaskGenerator(load_model(sys.argv[1]))
gen.generate(rgb)  # embedding into the cache, warm-up
best = float("inf")
for _ in range(2):
    tic = time.perf_counter()
    n = len(gen.generate(rgb))
    best = min(best, time.perf_counter() - tic)
print(json.dumps({"seconds": best, "masks": n}))
"""


def _run(src: Path, model: str, image: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", CHILD, model, image], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", default="default")
    ap.add_argument("--image", default=str(ROOT / "src/napari_sam/data/nuclei.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "rev"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.rev], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            sides = {args.rev: wt / "src", "working tree": ROOT / "src"}
            times: dict[str, list[float]] = {k: [] for k in sides}
            masks: dict[str, set[int]] = {k: set() for k in sides}
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for name in order:
                    res = _run(sides[name], args.model, args.image)
                    times[name].append(res["seconds"])
                    masks[name].add(res["masks"])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT,
                           capture_output=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in sides:
        print(f"{name}: median {med[name]:.3f} s, min {min(times[name]):.3f} s, "
              f"masks {sorted(masks[name])}")
    print(f"working tree / {args.rev} (median): {med['working tree'] / med[args.rev]:.3f}")


if __name__ == "__main__":
    main()
