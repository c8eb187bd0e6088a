"""Stand-in for ``torchvision.transforms``."""

from . import functional

__all__ = ["functional"]
