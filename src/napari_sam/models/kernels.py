"""Matrix products on the CPU through oneDNN, where PyTorch's default path is slower.

PyTorch runs float32 ``F.linear`` / ``torch.mm`` on the CPU through MKL. On AMD
CPUs MKL takes its AVX2 code path even where the CPU has AVX-512, while
oneDNN (also inside every x86 PyTorch wheel) picks its kernels from the CPU's
own feature flags. On the 2-core AMD EPYC (Zen 5) this project is measured on,
a float32 GEMM through oneDNN runs at about twice MKL's rate (``python
benchmarks/bench_kernels.py``). :func:`linear` routes inference-time products
there, with a ReLU or exact (erf) GELU fused in where asked, and falls back to
``F.linear`` wherever oneDNN is not usable: no oneDNN in the build, tensors not
float32 on the CPU, autograd recording, or ``NAPARI_SAM_ONEDNN=0`` in the
environment. Results are float32 products either way; only the summation
order differs.

It also holds the other CPU runtime helpers of the decoders: reusable scratch
tensors (:func:`scratch`) and the thread policy for few-prompt decodes
(:func:`threads_for_small_batches`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F

#: set to 0 to keep every product on PyTorch's default path
ENV_VAR = "NAPARI_SAM_ONEDNN"


@lru_cache(maxsize=1)
def onednn_available() -> bool:
    """True when oneDNN's fused linear kernel can be used (checked once, on a tiny product)."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=gen) for shape in ((5, 7), (3, 7), (3,)))
        with torch.inference_mode():
            y = F.linear(x, w, b)
            pairs = [(op(x, w, b, "none", [], ""), y), (op(x, w, b, "gelu", [], "none"), F.gelu(y)),
                     (op(x, w, b, "relu", [], ""), F.relu(y))]
        return all(torch.allclose(got, want, rtol=1e-5, atol=1e-5) for got, want in pairs)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn_applies(*tensors: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the oneDNN op has no backward
    ok = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    return ok and onednn_available()


#: activations :func:`linear` can apply, by name (oneDNN post-op name and algorithm)
ACTIVATIONS = {"gelu": ("gelu", "none"), "relu": ("relu", "")}


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``, then ``activation`` ("gelu": exact erf GELU, "relu", or None).

    Arguments:
      x: (..., K).
      weight: (N, K).
      bias: (N,) or None.

    Non-contiguous operands are copied first on the oneDNN path: its kernels
    take strided operands, but some layouts (a weight whose rows are a slice
    of wider rows) fall to a reference implementation hundreds of times slower.

    Returns (..., N), a new tensor.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or None, "
                         f"got {activation!r}.")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if x.numel() and _onednn_applies(*tensors):
        x, weight = x.contiguous(), weight.contiguous()
        attr, algorithm = ACTIVATIONS[activation] if activation else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        return F.gelu(y)
    return F.relu(y) if activation == "relu" else y


#: prompt batches up to this size decode on one thread under a passive OpenMP
#: wait policy (see :func:`threads_for_small_batches`)
SINGLE_THREAD_MAX_BATCH = 4


def openmp_threads_sleep() -> bool:
    """True when ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep at once."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


@contextlib.contextmanager
def threads_for_small_batches(batch: int) -> Iterator[None]:
    """Under a passive OpenMP wait policy, run a few-prompt decode on one intra-op
    thread, then restore the thread count.

    The decoder's operations on one or a few prompts are small (tens of
    microseconds each). With the default policy idle OpenMP threads spin for a
    moment before sleeping, so splitting even small operations over threads
    pays. With ``OMP_WAIT_POLICY=PASSIVE`` every parallel region wakes sleeping
    threads, which costs more than it gains. Measured on 2 cores (ViT-B click at
    1200 x 1600 / embedded model at 512 x 512): default policy, 2 threads 21 /
    4.9 ms vs 1 thread 40 / 6.3 ms (``benchmarks/bench_click.py --threads N``);
    passive policy, 2 threads 45 / 10.9 ms vs 1 thread 38 / 6.3 ms (a one-off
    timing, session 3). Only the calling thread's pool is affected (OpenMP
    thread counts are per thread); large prompt batches keep every thread.
    """
    n = torch.get_num_threads()
    if n == 1 or batch > SINGLE_THREAD_MAX_BATCH or not openmp_threads_sleep():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def scratch(
    work: dict | None, name: str, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """A scratch tensor of ``shape`` (contents undefined) like ``like``, kept in ``work``.

    Reused from the dict ``work`` when one of the same name, device, dtype and
    shape is there, else made (and stored); a new tensor when ``work`` is None.
    Fresh multi-MB allocations cost page faults (about 1 us per 4 KiB page), a
    noticeable part of a click.
    """
    if work is None:
        return like.new_empty(shape)
    key = (name, like.device, like.dtype)
    buf = work.get(key)
    if buf is None or buf.shape != shape:
        buf = work[key] = like.new_empty(shape)
    return buf
