"""Speed on a quiet and on a busy machine: the automatic thread policy against fixed threads.

One process measures, for each machine state (quiet; one core kept busy by another process,
as a browser or a second job would) and each thread policy (``NAPARI_SAM_THREADS=N``, torch's
plain behaviour with N threads; ``auto``, the default, see ``napari_sam.engine.threads``):

- the image embedding (``Predictor.compute_embedding``, the encoder without the cache);
- a click (one point, 3 full-resolution masks; median of ``--clicks``);
- everything-mode (``AutomaticMaskGenerator.generate`` on the image, cache bypassed).

The load is a separate process spinning on one core (``--load-nice`` runs it at a lower
priority instead, to show that niced work is not counted). Each figure is the median of
``--repeats`` runs (``--clicks`` for clicks), the two policies alternating; the ratio column is
the fixed policy's time over ``auto``'s, so above 1 means ``auto`` is faster.

    python benchmarks/bench_busy.py [--model default|vit_b|vit_t] [--shape 520 696]
        [--points-per-side 16] [--clicks 20] [--repeats 3] [--fixed 2] [--load-nice 0]
        [--skip-everything]

``--model vit_b`` / ``vit_t`` use random weights of that architecture (no download). The
OpenMP wait policy is left as the user's environment has it (printed); run it again with
``OMP_WAIT_POLICY=PASSIVE`` to compare that remedy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from napari_sam import AutomaticMaskGenerator, Predictor, load_model
from napari_sam.engine import threads
from napari_sam.sample_data import nuclei


def _model(name: str):
    if name == "default":
        return load_model("default", device="cpu")
    from napari_sam.models.build import build_sam

    torch.manual_seed(0)
    return build_sam(name).eval()


def _image(shape: tuple[int, int]) -> np.ndarray:
    sample = nuclei()[0][0]
    reps = (-(-shape[0] // sample.shape[0]), -(-shape[1] // sample.shape[1]))
    return np.ascontiguousarray(np.tile(sample, reps)[: shape[0], : shape[1]])


def _alternating(fn, policies: tuple[str, ...], repeats: int) -> dict[str, float]:
    """Median time of ``fn`` under each thread policy, the policies alternating (and their
    order swapped every round) so that the machine's phases affect them alike."""
    times: dict[str, list[float]] = {p: [] for p in policies}
    for r in range(repeats):
        for policy in policies if r % 2 == 0 else policies[::-1]:
            os.environ[threads.ENV_VAR] = policy
            t = time.perf_counter()
            fn()
            times[policy].append(time.perf_counter() - t)
    os.environ.pop(threads.ENV_VAR, None)
    return {p: statistics.median(v) for p, v in times.items()}


def measure(model, image: np.ndarray, args: argparse.Namespace,
            policies: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{measure: {policy: seconds}}."""
    predictor = Predictor(model)
    predictor.set_image(image)
    rgb = np.repeat(image[..., None], 3, axis=2)
    point = np.array([[image.shape[0] // 2, image.shape[1] // 2]])
    label = np.array([1])
    predictor.predict(points=point, labels=label)  # builds the per-image context
    out = {
        "embedding (s)": _alternating(lambda: predictor.compute_embedding(rgb), policies,
                                      args.repeats),
        "click (ms)": {
            p: 1e3 * t for p, t in _alternating(
                lambda: predictor.predict(points=point, labels=label), policies, args.clicks
            ).items()
        },
    }
    if not args.skip_everything:
        generator = AutomaticMaskGenerator(
            model, points_per_side=args.points_per_side, pred_iou_thresh=0.6,
            stability_score_thresh=0.85,
        )
        out["everything (s)"] = _alternating(
            lambda: generator.generate(image, use_cache=False), policies, args.repeats
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--shape", type=int, nargs=2, default=(520, 696))
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fixed", type=int, default=torch.get_num_threads(),
                        help="thread count of the fixed policy (default: torch's)")
    parser.add_argument("--load-nice", type=int, default=0,
                        help="nice value of the load process (0: normal priority)")
    parser.add_argument("--skip-everything", action="store_true")
    args = parser.parse_args()

    model = _model(args.model)
    image = _image(tuple(args.shape))
    print(f"# {platform.processor() or platform.machine()}, {threads.cpu_count()} cores, "
          f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"# model {args.model}, image {image.shape}, points per side {args.points_per_side}, "
          f"fixed policy = {args.fixed} threads, load nice {args.load_nice}")
    threads.warm_up()
    policies = (str(args.fixed), "auto")
    warm = argparse.Namespace(**{**vars(args), "repeats": 1, "clicks": 2})
    measure(model, image, warm, policies)

    rows = []
    for state in ("quiet", "busy"):
        load = None
        if state == "busy":
            cmd = [sys.executable, "-c", "while True: pass"]
            if args.load_nice:
                cmd = ["nice", "-n", str(args.load_nice), *cmd]
            load = subprocess.Popen(cmd)
            time.sleep(1.0)  # let the sampler see it
        try:
            chosen = threads.choose_threads()
            results = measure(model, image, args, policies)
        finally:
            if load is not None:
                load.kill()
                load.wait()
                time.sleep(1.0)
        print(f"# {state}: auto chose {chosen} thread(s)")
        for key, by_policy in results.items():
            fixed, auto = by_policy[policies[0]], by_policy["auto"]
            rows.append((state, key, fixed, auto, fixed / auto))

    print(f"\n| machine | measure | fixed {args.fixed} threads | auto | fixed / auto |")
    print("|---|---|---|---|---|")
    for state, key, fixed, auto, ratio in rows:
        print(f"| {state} | {key} | {fixed:.3f} | {auto:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
