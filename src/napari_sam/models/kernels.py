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
"""

from __future__ import annotations

import os
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
