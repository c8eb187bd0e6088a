"""The training loop: build, resume, fit, validate and checkpoint a SAM model.

One step:

1. draw ``batch_size`` images (order depends only on ``(seed, step)``), take a
   random view of each (:meth:`InstanceDataset.sample`) and encode them in one
   image-encoder call;
2. pick up to ``instances_per_image`` objects per image and simulate
   ``rounds`` of interactive prompting for them (:mod:`.simulation`); each
   round is one batched mask-decoder call per ``decoder_chunk`` objects;
3. each round's loss is back-propagated right away into a detached copy of
   the image embeddings (so only one decoder graph is alive at a time), and
   the accumulated embedding gradient is back-propagated through the image
   encoder once at the end.

With ``aux_dense > 0`` the model's AIS head (added when it has none) learns
the dense loss of :mod:`.dense_targets` beside SAM's losses, from the same
embeddings. With ``head_only`` a step is one encoder forward pass under
``no_grad`` and the AIS head's dense loss: no prompts, and every other
tensor of the model stays as it was.

Checkpoints and the run folder: :mod:`.run_folder`. Resume: a run resumes
from ``last.*`` when the folder holds a run with the same settings
(``config.json``; only :data:`~.config.RESUMABLE_CHANGES` such as ``steps``
may differ). A folder holding a run with other settings, or files that are
not a run's, is refused unless ``overwrite=True``, which deletes the run's
files and starts over; ``config.json`` therefore always describes the weights
in the folder.

Progress lines go to the ``napari_sam.training`` logger (INFO).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_sam.errors import CancelledError, CheckpointError, InvalidInputError

from .augment import AugmentConfig
from .config import TrainConfig, validate_config
from .datasets import InstanceDataset, find_pairs, load_ids
from .dense_targets import attach_ais_head, aux_backward, dense_loss, dense_targets_batch
from .losses import SamLoss
from .optim import build_optimizer, learning_rate
from .run_folder import (
    AUX_HEAD_FILE,
    append_log,
    load_state,
    load_weights,
    prepare_output_dir,
    save_model,
    save_state,
)
from .simulation import collect_objects, merge_metrics, run_rounds, split_first_prompt

__all__ = ["ProgressFn", "build_model", "log_to_stderr", "train", "train_step",
           "training_device", "validate"]

log = logging.getLogger("napari_sam.training")

ProgressFn = Callable[[int, int, dict[str, float]], None]


@contextmanager
def log_to_stderr() -> Iterator[None]:
    """Show the training logger's INFO messages on stderr, one plain line each (the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def build_model(model: Any = "vit_t", init: str | None = None) -> torch.nn.Module:
    """The model to train: ``init`` loaded (checkpoint path or zoo name) or built from ``model``.

    Raises InvalidInputError for an EfficientSAM (its training, with no mask prompt and a
    6-point limit, is not implemented).
    """
    built = _build_model(model, init)
    if getattr(built, "image_convention", None) == "stretch":
        raise InvalidInputError(
            "Training supports SAM and MobileSAM models; EfficientSAM cannot be trained or "
            "fine-tuned here yet. Choose a SAM config or checkpoint (e.g. model='vit_t')."
        )
    return built


def _build_model(model: Any, init: str | None) -> torch.nn.Module:
    if init:
        if Path(init).expanduser().is_file():
            from napari_sam.models.checkpoint import model_from_checkpoint

            return model_from_checkpoint(init)
        from napari_sam.models import zoo

        return zoo.load_model(init)
    from napari_sam.models.build import MODEL_CONFIGS, SamConfig, build_sam

    if isinstance(model, dict):
        model = SamConfig.from_dict(model)
    elif isinstance(model, (str, Path)) and str(model) not in MODEL_CONFIGS:
        path = Path(model)
        if not path.is_file():
            raise InvalidInputError(
                f"model {str(model)!r} is neither a config name ({sorted(MODEL_CONFIGS)}) "
                "nor a JSON config file."
            )
        model = SamConfig.from_dict(json.loads(path.read_text()))
    return build_sam(model)



def _image_order(n: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Dataset indices of ``step``: epochs are seeded permutations of ``range(n)``."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch, 1]).permutation(n)
        out.append(int(perm[i]))
    return out


def _train_val_ids(config: TrainConfig) -> tuple[list[str], list[str]]:
    """The training and validation image ids of ``config`` (disjoint)."""
    if not config.data:
        raise InvalidInputError("TrainConfig.data (the dataset folder) is required.")
    all_ids = [t[0] for t in find_pairs(config.data)]
    val_ids: list[str] = []
    train_ids = config.train_ids
    if config.val_ids:
        file_train, val_ids = load_ids(config.val_ids)
        if train_ids is None:
            train_ids = file_train
    if train_ids is None:
        val_set = set(val_ids)
        train_ids = [i for i in all_ids if i not in val_set]
    overlap = set(train_ids) & set(val_ids)
    if overlap:
        raise InvalidInputError(f"{len(overlap)} ids are both in train and val ids.")
    return train_ids, val_ids


def training_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to train on: ``device``, or the CPU when None.

    Raises:
      InvalidInputError: an unknown device, or one this machine does not have
        (e.g. ``"cuda"`` without CUDA).
    """
    from napari_sam.models.zoo import resolve_device

    if device is None:
        return torch.device("cpu")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise InvalidInputError(
            f"device {str(device)!r} requested but this machine has {n} CUDA device"
            f"{'s' if n != 1 else ''} (cuda:0 to cuda:{n - 1}); use one of them or 'cpu'"
        )
    return dev


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclasses.dataclass
class _Run:
    """What a training run holds while it trains (its folder, model, optimiser, best score)."""

    config: TrainConfig
    out: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    head: torch.nn.Module | None  # the AIS head this run trains (model.ais_head), if any
    best: float = -math.inf  # best validation score so far (none yet)

    @property
    def last(self) -> Path:
        return self.out / "last.safetensors"

    @property
    def state_path(self) -> Path:
        return self.out / "last_state.pt"

    def resume(self) -> int:
        """Load ``last.*`` into the run; returns the step to continue at.

        A run written before the head lived in the model (``aux_head.pt`` beside
        a head-less ``last.safetensors``) has its head read from that file.
        """
        last, state_path = self.last, self.state_path
        legacy = self.out / AUX_HEAD_FILE if self.head is not None else None
        meta = load_weights(self.model, last, legacy_head=legacy)
        state = load_state(state_path)
        if str(meta.get("step", "")) != str(state["step"]):
            raise CheckpointError(
                f"{last} (step {meta.get('step')}) and {state_path} (step {state['step']}) "
                "do not match (interrupted while saving?); pass --overwrite to start over there."
            )
        self._load_optimizer(state["optimizer"])
        self.best = float(state.get("best", -math.inf))
        start = int(state["step"])
        log.info("resuming from step %d (%s)", start, last)
        return start

    def _load_optimizer(self, saved: dict[str, Any]) -> None:
        """Load the optimiser state; a run saved with(out) the aux head is a typed error."""
        groups = saved.get("param_groups")
        ours = len(self.optimizer.param_groups)
        if isinstance(groups, list) and {len(groups), ours} == {2, 3}:  # the head: group 3
            if len(groups) > ours:
                fix = ("it was trained with --aux-dense (it trains the AIS head): "
                       "pass --aux-dense WEIGHT with that run's weight")
            else:
                fix = "it was trained without --aux-dense: leave --aux-dense out (or 0)"
            raise InvalidInputError(
                f"Cannot resume the run in {self.out}: {fix}, or pass --overwrite to start over."
            )
        try:
            self.optimizer.load_state_dict(saved)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"Cannot resume from {self.state_path}: its optimizer state does not fit this "
                f"run ({exc}); pass --overwrite to start over there."
            ) from None

    def save(self, step: int) -> None:
        """Write the checkpoint of ``step``: the optimiser state last, so that a crash in
        between leaves the previous ``last_state.pt`` (and a step mismatch that is refused)."""
        meta = {"step": str(step), "train_config": json.dumps(self.config.to_dict())}
        save_model(self.model, self.last, meta)
        save_state({"step": step, "best": self.best, "optimizer": self.optimizer.state_dict()},
                   self.state_path)
        legacy = self.out / AUX_HEAD_FILE
        if self.head is not None and legacy.is_file():  # superseded: the head is in last.*
            legacy.unlink()
            log.info("the AIS head is now saved in %s; removed the old %s", self.last.name,
                     legacy.name)

    def train_mode(self) -> None:
        """Training mode for what learns; eval mode (fixed norm statistics) for what is frozen."""
        if self.config.head_only:
            self.model.eval()
        else:
            self.model.train()
            if self.config.freeze_encoder:
                self.model.image_encoder.eval()
        if self.head is not None:
            self.head.train()
        elif getattr(self.model, "ais_head", None) is not None:
            self.model.ais_head.eval()


def _datasets(
    config: TrainConfig, model: torch.nn.Module
) -> tuple[InstanceDataset, InstanceDataset | None]:
    """The training dataset and the validation one (None without validation)."""
    train_ids, val_ids = _train_val_ids(config)
    aug = AugmentConfig.preset(config.augment_preset) if config.augment else AugmentConfig.none()
    common = dict(
        img_size=int(model.image_encoder.img_size),
        low_res_size=int(model.prompt_encoder.mask_input_size[0]),
        pixel_mean=model.pixel_mean.flatten().tolist(),
        pixel_std=model.pixel_std.flatten().tolist(),
        cache=config.cache_images,
    )
    data = InstanceDataset(
        config.data,
        ids=train_ids,
        augment=aug,
        full_view_prob=config.full_view_prob,
        scale_range=tuple(config.scale_range),
        min_area=config.min_area,
        **common,
    )
    val = None
    if val_ids and config.val_every > 0:
        val = InstanceDataset(config.data, ids=val_ids[: config.val_images], **common)
    return data, val


def train(
    config: TrainConfig,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Train (or resume training) a SAM model; returns the path of ``last.safetensors``.

    Arguments:
      progress: called as ``progress(step, steps, metrics)`` after every step.
      cancel: polled before every step; when it returns True a checkpoint is
        written and :class:`~napari_sam.errors.CancelledError` is raised.
      overwrite: start over in an output folder that holds a run (its files
        are deleted first); otherwise such a run is resumed if its
        ``config.json`` has the same settings and refused if not.
      device: torch device to train on (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
        ``"mps"``); default the CPU. Not a setting of the run: a run resumes on
        any device.

    Raises:
      InvalidInputError: an unusable setting, or an output folder holding
        another run (see the module docstring).
      CheckpointError: the run to resume has a damaged or unsafe checkpoint.
    """
    validate_config(config)
    device = training_device(device)
    resume = prepare_output_dir(config, overwrite)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.init).to(device)
    if config.head_only:
        model.requires_grad_(False)
    elif config.freeze_encoder:
        model.image_encoder.requires_grad_(False)
    data, val = _datasets(config, model)
    optimizer = build_optimizer(model, config)
    head = attach_ais_head(model, config, optimizer)
    run = _Run(config, out, model, optimizer, head)
    run.train_mode()
    start = run.resume() if resume else 0
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    _fit(run, data, val, start, progress, cancel)
    if not run.last.is_file():
        run.save(start)
    return run.last


def _fit(
    run: _Run,
    data: InstanceDataset,
    val: InstanceDataset | None,
    start: int,
    progress: ProgressFn | None,
    cancel: Callable[[], bool] | None,
) -> None:
    """Train ``run`` from step ``start`` to ``config.steps``: log, validate and checkpoint."""
    config, model, optimizer = run.config, run.model, run.optimizer
    params = [p for p in model.parameters() if p.requires_grad]  # the AIS head too, if trained
    log_path = run.out / "log.jsonl"
    tic = time.perf_counter()
    for step in range(start, config.steps):
        if cancel is not None and cancel():
            run.save(step)
            raise CancelledError(f"Training cancelled at step {step}; resume with the same config.")
        lr = learning_rate(config, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        weights = config.loss_kwargs(step)
        metrics = train_step(
            model, data, config, step, params, optimizer, weights, aux_head=run.head
        )
        metrics.update(step=step + 1, lr=lr, sec=time.perf_counter() - tic)
        tic = time.perf_counter()
        done = step + 1
        if val is not None and (done % config.val_every == 0 or done == config.steps):
            v = validate(model, val, config)
            metrics.update({f"val_{k}": x for k, x in v.items()})
            # head-only runs keep the head of the lowest validation dense loss
            score = -v["aux_dense"] if config.head_only else v["iou_mean"]
            if score > run.best:
                run.best = score
                save_model(model, run.out / "best.safetensors", {"step": str(done)})
            run.train_mode()
        if done % config.log_every == 0 or done == config.steps or "val_loss" in metrics:
            append_log(log_path, metrics)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("step",))
            log.info("step %d/%d %s", done, config.steps, shown)
        if done % config.checkpoint_every == 0 or done == config.steps:
            run.save(done)
        if progress is not None:
            progress(done, config.steps, metrics)


def train_step(
    model: torch.nn.Module,
    data: InstanceDataset,
    config: TrainConfig,
    step: int,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    weights: dict[str, float],
    aux_head: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One optimisation step (see the module doc); returns its metrics.

    With ``aux_head`` (and ``config.aux_dense > 0``) the dense auxiliary loss
    of :mod:`.dense_targets` is added, weighted by ``config.aux_dense``; with
    ``config.head_only`` it is the only loss (:func:`_head_only_step`).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng([config.seed, step, 2])
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    indices = _image_order(len(data), config.seed, step, config.batch_size)
    samples = [data.sample(i, rng, augment=config.augment) for i in indices]
    if config.head_only:
        if aux_head is None:
            raise InvalidInputError("TrainConfig.head_only needs the model's AIS head "
                                    "(attach_ais_head adds it).")
        return _head_only_step(model, aux_head, samples, data.low_res_size, config, params,
                               optimizer, time.perf_counter() - t0)
    objects = collect_objects(
        samples, config.instances_per_image, data.low_res_size, gen, config.min_area
    )
    optimizer.zero_grad(set_to_none=True)
    if len(objects) == 0:
        return {"loss": float("nan"), "objects": 0}
    images = torch.stack([s.image for s in samples]).to(_device_of(model))
    t1 = time.perf_counter()
    if config.freeze_encoder:
        with torch.no_grad():
            emb = model.image_encoder(images)
        leaf = emb
    else:
        emb = model.image_encoder(images)
        leaf = emb.detach().requires_grad_(True)
    t2 = time.perf_counter()
    aux_value = None
    if aux_head is not None:
        aux_value = aux_backward(aux_head, leaf, [s.labels for s in samples],
                                 [s.input_size for s in samples], data.low_res_size,
                                 config.aux_dense)
    t_aux = time.perf_counter() - t2
    point_rows, box_rows = split_first_prompt(len(objects), config.box_prob, gen)
    groups: list[tuple[list[SamLoss], float]] = []
    n_total = len(objects)
    chunk = max(1, config.decoder_chunk)
    for first, rows in (("point", point_rows), ("box", box_rows)):
        for part in rows.split(chunk) if rows.numel() else ():
            w = part.numel() / n_total
            # scaled so that the step's loss is the mean over objects and rounds
            rounds = run_rounds(
                model,
                leaf,
                objects.select(part),
                config.rounds,
                first=first,
                mask_only_rounds=config.mask_only_rounds,
                point_mode=config.point_mode,
                generator=gen,
                rng=rng,
                loss_kwargs=weights,
                backward_scale=w / config.rounds,
            )
            groups.append((rounds, w))
    t3 = time.perf_counter()
    if not config.freeze_encoder and leaf.grad is not None:
        emb.backward(leaf.grad)
    if config.grad_clip > 0:
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    else:
        gnorm = float("nan")
    optimizer.step()
    metrics = merge_metrics(groups)
    if aux_value is not None:
        metrics.update(aux_dense=aux_value, t_aux=t_aux)
    t4 = time.perf_counter()
    metrics.update(
        objects=n_total,
        grad_norm=gnorm,
        t_data=t1 - t0,
        t_encoder=t2 - t1,
        t_decoder=t3 - t2 - t_aux,
        t_backward=t4 - t3,
    )
    return metrics


def _validate_head(model: torch.nn.Module, data: InstanceDataset) -> dict[str, float]:
    """Mean dense loss of ``model.ais_head`` over the whole images of ``data`` (no grad)."""
    total = 0.0
    for i in range(len(data)):
        s = data[i]
        emb = model.image_encoder(s.image[None].to(_device_of(model)))
        targets, valid = dense_targets_batch([s.labels], [s.input_size], data.low_res_size)
        total += float(dense_loss(model.ais_head(emb), targets.to(emb.device),
                                  valid.to(emb.device)))
    mean = total / max(len(data), 1)
    return {"loss": mean, "aux_dense": mean}


def _head_only_step(
    model: torch.nn.Module,
    head: torch.nn.Module,
    samples: list[Any],
    low_res_size: int,
    config: TrainConfig,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    t_data: float,
) -> dict[str, float]:
    """One step of ``head_only``: encode ``samples`` under ``no_grad``, fit the AIS head to the
    dense targets of their labels (unweighted dense loss); returns the metrics."""
    optimizer.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    images = torch.stack([s.image for s in samples]).to(_device_of(model))
    with torch.no_grad():
        emb = model.image_encoder(images)
    t2 = time.perf_counter()
    value = aux_backward(head, emb, [s.labels for s in samples], [s.input_size for s in samples],
                         low_res_size, 1.0)
    t3 = time.perf_counter()
    if config.grad_clip > 0:
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    else:
        gnorm = float("nan")
    optimizer.step()
    return {"loss": value, "aux_dense": value, "grad_norm": gnorm, "t_data": t_data,
            "t_encoder": t2 - t1, "t_aux": t3 - t2, "t_backward": time.perf_counter() - t3}


@torch.no_grad()
def validate(
    model: torch.nn.Module, data: InstanceDataset, config: TrainConfig
) -> dict[str, float]:
    """Deterministic validation: whole images, every object, innermost first point.

    Returns the mean loss, IoU after the first point (``iou_first``), after the
    last round (``iou_last``), their mean over rounds (``iou_mean``) and the IoU
    of a tight box (``iou_box``), all at low resolution. With ``config.head_only``
    (nothing else learns) only the AIS head's dense loss on each whole image,
    averaged over images: ``aux_dense`` (and ``loss``, the same).
    """
    model.eval()
    if config.head_only:
        return _validate_head(model, data)
    weights = config.loss_kwargs()
    totals: dict[str, float] = {}
    n = 0
    for i in range(len(data)):
        s = data[i]
        objects = collect_objects([s], None, data.low_res_size, None, config.min_area)
        if len(objects) == 0:
            continue
        emb = model.image_encoder(s.image[None].to(_device_of(model)))
        pts = run_rounds(
            model,
            emb,
            objects,
            config.rounds,
            "point",
            point_mode="center",
            first_point="center",
            loss_kwargs=weights,
        )
        box = run_rounds(model, emb, objects, 1, "box", box_noise=False, loss_kwargs=weights)
        m = len(objects)
        vals = {
            "loss": float(pts[0].total),
            "iou_first": float(pts[0].iou.mean()),
            "iou_last": float(pts[-1].iou.mean()),
            "iou_mean": float(torch.stack([x.iou.mean() for x in pts]).mean()),
            "iou_box": float(box[0].iou.mean()),
        }
        for k, v in vals.items():
            totals[k] = totals.get(k, 0.0) + v * m
        n += m
    return {k: v / max(n, 1) for k, v in totals.items()}
