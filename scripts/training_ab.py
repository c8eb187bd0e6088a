"""A/B check of a training refactor: seeded 2-step runs of two source trees must match bit for bit.

Runs, for each tree, three short seeded trainings of the tiny test model on a synthetic
dataset (plain; aux-dense + validation + step schedule + mask-only round + loss window +
focal ramp; a 1-step run resumed to 2 steps) in a subprocess, then compares the weights
(last/best), the aux head, log.jsonl (timings left out) and config.json contents.

usage (from the repository root):
  OMP_NUM_THREADS=1 python scripts/training_ab.py /path/to/main/src src /tmp/ab
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RUNS = r'''
import json, sys, warnings
from pathlib import Path
from reference_utils import tiny_vit_sam_config
from napari_sam.training import TrainConfig, train
from training_helpers import write_dataset

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
data = out / "data"
write_dataset(data, n=4, size=64)
(out / "val.json").write_text(json.dumps(["im3"]))
warnings.simplefilter("ignore")
common = dict(data=str(data), model=tiny_vit_sam_config(), batch_size=2, instances_per_image=3,
              rounds=2, lr=1e-3, warmup_steps=1, log_every=1, seed=0, num_threads=1)
train(TrainConfig(output_dir=str(out / "a"), steps=2, **common))
train(TrainConfig(output_dir=str(out / "b"), steps=2, aux_dense=0.5, val_ids=str(out / "val.json"),
                  val_every=1, schedule="step", box_prob=0.7, mask_only_rounds=1, loss_window=2.0,
                  loss_window_steps=2, focal_ramp_steps=2, **common))
train(TrainConfig(output_dir=str(out / "c"), steps=1, **common))
train(TrainConfig(output_dir=str(out / "c"), steps=2, **common))
'''


def _run(src: Path, out: Path) -> None:
    tests = Path(__file__).resolve().parents[1] / "tests"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{tests}"}
    subprocess.run([sys.executable, "-c", RUNS, str(out)], env=env, check=True)


def _log(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not (k.startswith("t_") or k == "sec")}
            for line in path.read_text().splitlines()]


def main() -> int:
    import torch
    from safetensors.torch import load_file

    ref_src, new_src, out = (Path(a).resolve() for a in sys.argv[1:4])
    _run(ref_src, out / "ref")
    _run(new_src, out / "new")
    same = True
    for run in "abc":
        a, b = out / "ref" / run, out / "new" / run
        for name in ("last.safetensors", "best.safetensors"):
            if (a / name).exists():
                x, y = load_file(str(a / name)), load_file(str(b / name))
                ok = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                same &= ok
                print(run, name, "identical" if ok else "DIFFERENT")
        if (a / "aux_head.pt").exists():
            x, y = torch.load(a / "aux_head.pt"), torch.load(b / "aux_head.pt")
            ok = all(torch.equal(x[k], y[k]) for k in x)
            same &= ok
            print(run, "aux_head.pt", "identical" if ok else "DIFFERENT")
        ok = _log(a / "log.jsonl") == _log(b / "log.jsonl")
        same &= ok
        print(run, "log.jsonl", "identical" if ok else "DIFFERENT")
        ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
        for c in (ca, cb):
            c["output_dir"] = c["data"] = c["val_ids"] = ""
        same &= ca == cb
        print(run, "config.json", "same contents" if ca == cb else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
