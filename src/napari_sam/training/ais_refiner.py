"""Training the AIS map refiner (:mod:`napari_sam.models.ais_refiner`) of a model with an AIS head.

The refiner learns from the model's own maps: every training image is segmented once
by the frozen model as :class:`~napari_sam.engine.ais.InstanceSegmenter` does it (its
own tiling, the head's maps upsampled to the image, no refiner), and the maps are
kept beside the image and the full-resolution targets of its labels
(:func:`~napari_sam.training.dense_targets.full_res_targets`). Training then draws
random crops (``crop`` pixels, images chosen in proportion to their area; smaller
images are zero-padded), random 90-degree rotations, flips and an intensity jitter
of the image channels, and minimises :func:`~napari_sam.training.dense_targets.dense_loss`
(BCE + soft Dice on the four maps) with AdamW and a one-cycle schedule.

``scripts/train_ais_refiner.py`` runs both steps and saves the model with its
refiner; the maps and checkpoints stay in the run folder, so a stopped run resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.models.ais_refiner import AisRefiner
from napari_sam.models.build import build_sam
from napari_sam.models.sam import PIXEL_MEAN, PIXEL_STD
from napari_sam.training.dense_targets import dense_loss, full_res_targets

__all__ = ["AisRefinerImage", "ais_refiner_images", "train_ais_refiner", "with_ais_refiner"]

log = logging.getLogger("napari_sam.training")

_MEAN = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)


@dataclasses.dataclass
class AisRefinerImage:
    """One training image: rgb (H, W, 3) uint8, maps (4, H, W) float16 head
    probabilities, targets (4, H, W) float16."""

    rgb: np.ndarray
    maps: np.ndarray
    targets: np.ndarray

    def save(self, path: str | Path) -> None:
        np.savez(path, rgb=self.rgb, maps=self.maps, targets=self.targets)

    @classmethod
    def load(cls, path: str | Path) -> AisRefinerImage:
        with np.load(path) as d:
            return cls(d["rgb"], d["maps"], d["targets"])


def ais_refiner_images(
    model: torch.nn.Module, images: Iterable[tuple[np.ndarray, np.ndarray]],
) -> Iterable[AisRefinerImage]:
    """The refiner's training images from ``model``'s head maps (a generator).

    Arguments:
      model: a model with an AIS head (frozen; its own AIS refiner is not used).
      images: ``(rgb (H, W, 3) uint8, labels (H, W) int)`` pairs.
    """
    from napari_sam.engine.ais import InstanceSegmenter
    from napari_sam.engine.progress import run_steps

    segmenter = InstanceSegmenter(model, refine=False)
    for rgb, labels in images:
        with torch.no_grad():
            maps = run_steps(segmenter._iter_maps(rgb, None, False))
        yield AisRefinerImage(rgb, maps.astype(np.float16),
                              full_res_targets(labels).astype(np.float16))


def refiner_input(rgb: np.ndarray, maps: np.ndarray) -> torch.Tensor:
    """(7, H, W) float32 refiner input of an (H, W, 3) uint8 image and its (4, H, W) maps."""
    image = (torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() - _MEAN) / _STD
    return torch.cat([image, torch.from_numpy(np.asarray(maps, np.float32))], 0)


def train_ais_refiner(
    data: Sequence[AisRefinerImage],
    steps: int = 1000,
    crop: int = 128,
    batch_size: int = 16,
    lr: float = 2e-3,
    widths: tuple[int, ...] = (8, 16, 32, 64),
    seed: int = 0,
    state: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 100,
) -> AisRefiner:
    """Train an :class:`AisRefiner` on ``data`` (see the module doc for the recipe).

    ``state`` (from an earlier ``checkpoint`` call) resumes a run; ``checkpoint`` is
    called with the run's state every ``checkpoint_every`` steps and at the end.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    areas = np.array([d.rgb.shape[0] * d.rgb.shape[1] for d in data], np.float64)
    p = areas / areas.sum()
    refiner = AisRefiner(widths)
    opt = torch.optim.AdamW(refiner.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.05)
    start = 0
    if state is not None:
        refiner.load_state_dict(state["refiner"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["rng"]
        start = int(state["step"])
    refiner = refiner.to(memory_format=torch.channels_last).train()
    for step in range(start + 1, steps + 1):
        xs, ys = [], []
        for _ in range(batch_size):
            item = data[rng.choice(len(data), p=p)]
            H, W = item.rgb.shape[:2]
            r0 = rng.integers(0, max(1, H - crop + 1))
            c0 = rng.integers(0, max(1, W - crop + 1))
            x = refiner_input(item.rgb[r0:r0 + crop, c0:c0 + crop],
                              item.maps[:, r0:r0 + crop, c0:c0 + crop])
            y = torch.from_numpy(item.targets[:, r0:r0 + crop, c0:c0 + crop].astype(np.float32))
            pad = (0, crop - x.shape[2], 0, crop - x.shape[1])
            x, y = F.pad(x, pad), F.pad(y, pad)
            k = int(rng.integers(4))
            x, y = torch.rot90(x, k, (1, 2)), torch.rot90(y, k, (1, 2))
            if rng.random() < 0.5:
                x, y = x.flip(2), y.flip(2)
            x[:3] = x[:3] * (1 + 0.2 * rng.standard_normal()) + 0.2 * rng.standard_normal()
            xs.append(x)
            ys.append(y)
        x = torch.stack(xs).contiguous(memory_format=torch.channels_last)
        loss = dense_loss(refiner(x), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            log.info("AIS refiner step %d/%d loss=%.4f", step, steps, loss.item())
        if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
            # a copy: the live tensors go on changing after the call
            checkpoint(copy.deepcopy({
                "refiner": refiner.state_dict(), "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(), "rng": rng.bit_generator.state, "step": step}))
    return refiner.to(memory_format=torch.contiguous_format).eval()


def with_ais_refiner(model: torch.nn.Module, refiner: AisRefiner) -> torch.nn.Module:
    """A copy of ``model`` (a Sam with a config) that has ``refiner`` as its AIS refiner."""
    config = dataclasses.replace(model.config, ais_refiner_widths=refiner.widths)
    out = build_sam(config)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("ais_refiner.")}
    out.load_state_dict(own, strict=False)
    out.ais_refiner.load_state_dict(refiner.state_dict())
    return out.eval()
