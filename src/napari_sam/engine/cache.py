"""A thread-safe LRU cache of image embeddings.

Computing an embedding is the expensive step (seconds for ViT-B on a CPU);
predicting a mask from it is cheap. The cache lets a Predictor (or several
sharing one cache) go back to an image it has seen without re-running the
encoder. Keys combine the model's identity with a hash of the *normalised*
uint8 image, so the same layer data with different contrast limits gets a
different entry, and so does the same image under a different model.

The widget computes embeddings in a worker thread while the main thread reads,
so every method takes a lock.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch

from napari_sam.errors import InvalidInputError

__all__ = ["CacheEntry", "EmbeddedImage", "EmbeddingCache", "image_key", "model_key"]


class EmbeddedImage(NamedTuple):
    """An image embedding and the geometry it was computed for: what
    :meth:`~napari_sam.engine.predictor.Predictor.embed` returns, the cache
    stores and everything-mode consumes.

    features: (1, C, E, E) encoder output (on the device it was computed on).
    input_size: (h, w) of the resized image inside the model input.
    original_size: (H, W) of the original image.
    image: (H, W, 3) uint8, the normalised image itself, or None; kept for the
      mask refiner (:mod:`napari_sam.engine.refine`), which reads native pixels.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    image: np.ndarray | None = None


#: the former name of :class:`EmbeddedImage`
CacheEntry = EmbeddedImage


def image_key(rgb: np.ndarray) -> str:
    """Hash of an image's bytes, dtype and shape (blake2b, 128 bits, hex)."""
    arr = np.ascontiguousarray(rgb)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


# Unique, never-reused ids for model objects (``id()`` can be reused after a
# model is garbage collected, which would make a stale entry look valid).
_MODEL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_COUNTER = itertools.count()
_MODEL_LOCK = threading.Lock()


def model_key(model: torch.nn.Module) -> str:
    """A key unique to this model object for the life of the process.

    Weights changed in place (e.g. by training) are *not* detected; call
    :meth:`EmbeddingCache.clear` after modifying a model.
    """
    with _MODEL_LOCK:
        key = _MODEL_IDS.get(model)
        if key is None:
            key = f"{type(model).__name__}#{next(_MODEL_COUNTER)}"
            _MODEL_IDS[model] = key
        return key


def _nbytes(entry: CacheEntry) -> int:
    image = getattr(entry, "image", None)
    return (entry.features.element_size() * entry.features.nelement()
            + (0 if image is None else int(image.nbytes)))


class EmbeddingCache:
    """Least-recently-used cache of :class:`CacheEntry`, bounded by total tensor bytes.

    Arguments:
      max_bytes: capacity in bytes (default 512 MiB, about 128 ViT embeddings
        of 4 MiB each). Entries larger than this are not stored; 0 disables
        caching.
    """

    #: default capacity, 512 MiB: the one definition of the embedding cache size
    DEFAULT_BYTES = 512 * 2**20

    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        if max_bytes < 0:
            raise InvalidInputError(f"max_bytes must be >= 0, got {max_bytes}.")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: torch.nn.Module, rgb: np.ndarray) -> tuple[str, str]:
        """Cache key of the normalised (H, W, 3) uint8 image ``rgb`` under ``model``."""
        return model_key(model), image_key(rgb)

    def get(self, key: tuple[str, str]) -> CacheEntry | None:
        """The entry for ``key`` (marking it most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple[str, str], entry: CacheEntry) -> None:
        """Store ``entry``, evicting least recently used entries to stay within ``max_bytes``."""
        size = _nbytes(entry)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= _nbytes(old)
            if size > self.max_bytes:
                return
            self._entries[key] = entry
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= _nbytes(evicted)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """Total bytes of the cached feature tensors."""
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(entries={len(self)}, nbytes={self.nbytes}, "
            f"max_bytes={self.max_bytes})"
        )
