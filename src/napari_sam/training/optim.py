"""The optimiser (AdamW with decay groups) and the learning-rate schedule of training."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

__all__ = ["build_optimizer", "learning_rate"]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then the decay schedule."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        n = sum(step >= config.steps * f for f in (2 / 3, 8 / 9))
        return config.lr * (0.1**n)
    span = max(1, config.steps - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    lo = config.lr * config.min_lr_ratio
    return lo + 0.5 * (config.lr - lo) * (1 + math.cos(math.pi * t))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model``; norms, biases, position tables and
    prompt embeddings get no weight decay (group 1), the rest ``config.weight_decay`` (group 0).
    The AIS head (``ais_head.*``) is left out: when a run trains it,
    :func:`~napari_sam.training.dense_targets.attach_ais_head` adds it as group 2.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("ais_head."):
            continue
        # no weight decay on norms, biases, position tables and prompt embeddings
        if p.ndim < 2 or "pos" in name or "embed.weight" in name or name.endswith("_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))

