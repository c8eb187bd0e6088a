"""Time and peak memory of ``napari-sam embed`` on a stack (issue 16).

Writes a synthetic ``--planes`` x ``--size`` x ``--size`` uint16 stack (blurred blobs
plus noise, as microscopy nuclei) to a TIFF in a temporary folder, then runs the real
CLI in a subprocess, as a user would::

    python -m napari_sam.cli embed STACK.tif --out STACK.sam.zarr [--model M] [--tile-size T]

and reads the child's peak RSS (``ru_maxrss`` of the waited-for child, via
``os.wait4``). A second run on the same store is timed too (it must be a no-op: the
store's signature matches and every entry is done): its time is the fixed cost
(start-up, model, checks). Reports the wall times, (first - no-op) / planes, peak RSS
against the size of the stack and of the store on disk (memory must stay bounded:
the embeddings are never all held in RAM).

    python benchmarks/bench_embed_store.py [--planes 50] [--size 1024] [--model default]
        [--tile-size auto] [--threads N] [--json OUT.json]

``--threads`` sets ``NAPARI_SAM_THREADS`` for the child (0: napari-sam's automatic
policy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def synthetic_stack(planes: int, size: int, seed: int = 0) -> np.ndarray:
    """(planes, size, size) uint16: Gaussian blobs of radius ~size/40 drifting slowly
    through z, on noise. Built plane by plane (a 50 x 1024 x 1024 stack is 100 MB)."""
    rng = np.random.default_rng(seed)
    n_blobs = 60
    centres = rng.uniform(0, size, (n_blobs, 2))
    radii = rng.uniform(size / 60, size / 25, n_blobs)
    drift = rng.normal(0, size / 400, (n_blobs, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stack = np.empty((planes, size, size), np.uint16)
    for z in range(planes):
        plane = np.zeros((size, size), np.float32)
        for (cy, cx), r in zip(centres + z * drift, radii, strict=True):
            plane += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        stack[z] = np.clip(300 + 3000 * plane + rng.normal(0, 80, plane.shape), 0, 65535)
    return stack


def _run_cli(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stderr) of ``python -m napari_sam.cli ARGS``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "napari_sam.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage
    seconds = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"napari-sam {' '.join(args)} exited with {code}:\n{out}\n{err}")
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return seconds, rss, err


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--planes", type=int, default=50)
    p.add_argument("--size", type=int, default=1024, help="plane side in pixels")
    p.add_argument("--model", default="default", help="passed to --model")
    p.add_argument("--tile-size", default="auto", help="passed to --tile-size")
    p.add_argument("--threads", type=int, default=0,
                   help="NAPARI_SAM_THREADS for the CLI (0: napari-sam's automatic policy)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.planes < 1 or args.size < 16:
        p.error("--planes must be >= 1 and --size >= 16")

    import tifffile

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if x)}
    if args.threads:
        env["NAPARI_SAM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "stack.tif"
        store = Path(tmp) / "stack.sam.zarr"
        stack = synthetic_stack(args.planes, args.size)
        # 3 planes would otherwise pass for RGB samples: say they are z
        tifffile.imwrite(image, stack, photometric="minisblack", metadata={"axes": "ZYX"})
        stack_mb = stack.nbytes / 2**20
        del stack
        cli = ["embed", str(image), "--out", str(store), "--model", args.model,
               "--tile-size", args.tile_size]
        print(f"napari-sam {' '.join(cli)} ...", file=sys.stderr, flush=True)
        first_s, first_rss, log = _run_cli(cli, env)
        again_s, again_rss, _ = _run_cli(cli, env)
        store_mb = _folder_mb(store)
        from napari_sam.engine.store import EmbeddingStore

        opened = EmbeddingStore.open(store)
        entries, done = len(opened), int(opened.done().sum())

    setup = (f"napari-sam embed, model {args.model}, tile size {args.tile_size}, stack "
             f"{args.planes} x {args.size} x {args.size} uint16 TIFF, NAPARI_SAM_THREADS="
             f"{env.get('NAPARI_SAM_THREADS', 'unset')}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"load average {os.getloadavg()[0]:.1f}")
    print(f"\n{setup}\n")
    # the no-op run is the fixed cost (start-up, imports, model, checks): the difference
    # is the embedding work
    per_plane = (first_s - again_s) / args.planes
    print("| run | wall (s) | (first - no-op) per plane (s) | peak RSS (MB) |")
    print("|---|---|---|---|")
    print(f"| first ({entries} entries) | {first_s:.1f} | {per_plane:.2f} | {first_rss:.0f} |")
    print(f"| again (no-op) | {again_s:.1f} | - | {again_rss:.0f} |")
    print(f"\nstack {stack_mb:.0f} MB, store on disk {store_mb:.0f} MB, "
          f"{done} of {entries} entries done")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "setup": setup, "first_s": first_s, "first_peak_rss_mb": first_rss,
            "again_s": again_s, "per_plane_s": per_plane, "again_peak_rss_mb": again_rss,
            "stack_mb": stack_mb,
            "store_mb": store_mb, "entries": entries, "done": done,
            "cli_stderr_tail": log[-2000:]}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
