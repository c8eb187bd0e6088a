"""kernels.linear: the oneDNN route agrees with F.linear and falls back where it must."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_sam.models import kernels
from napari_sam.models.common import MLPBlock


def _operands(m=37, k=29, n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g),
            torch.randn(n, generator=g))


@pytest.fixture
def onednn_off(monkeypatch):
    """kernels with oneDNN switched off through the environment variable."""
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    kernels.onednn_available.cache_clear()
    yield
    monkeypatch.delenv(kernels.ENV_VAR)
    kernels.onednn_available.cache_clear()


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(activation, bias):
    x, w, b = _operands()
    b = b if bias else None
    want = F.linear(x, w, b)
    want = {"gelu": F.gelu, "relu": F.relu}.get(activation, lambda t: t)(want)
    with torch.inference_mode():
        got = kernels.linear(x, w, b, activation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_strided_operands():
    """Transposed and sliced operands give the same product (the slice of wider rows
    is the layout oneDNN runs through a reference kernel unless copied first)."""
    x, w, _ = _operands(m=64, k=16, n=300)
    wide = torch.randn(300, 40)
    sliced = wide[:, :16]
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, sliced), x @ sliced.t(), rtol=1e-5, atol=1e-5)
        xt = x.t().contiguous().t()
        torch.testing.assert_close(kernels.linear(xt, w), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_linear_batched_and_empty():
    x, w, b = _operands()
    x3 = x.view(1, 37, 29).expand(3, 37, 29)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x3, w, b), F.linear(x3, w, b))
        assert kernels.linear(x[:0], w, b).shape == (0, 23)


def test_linear_keeps_autograd():
    """With autograd recording, parameters get gradients (the oneDNN op has no backward)."""
    x, w, b = _operands()
    w = w.clone().requires_grad_(True)
    y = kernels.linear(x, w, b, "gelu")
    y.sum().backward()
    w_ref = w.detach().clone().requires_grad_(True)
    F.gelu(F.linear(x, w_ref, b)).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_linear_other_dtypes_fall_back():
    x, w, b = (t.double() for t in _operands())
    with torch.inference_mode():
        got = kernels.linear(x, w, b, "relu")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.relu(F.linear(x, w, b)))


def test_environment_switches_onednn_off(onednn_off, monkeypatch):
    assert kernels.onednn_available() is False

    def fail(*args, **kwargs):
        raise AssertionError("oneDNN called although switched off")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fail, raising=False)
    x, w, b = _operands()
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))


def test_onednn_used_when_available(monkeypatch):
    if not kernels.onednn_available():
        pytest.skip("this PyTorch build has no usable oneDNN linear")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    x, w, b = _operands()
    with torch.inference_mode():
        kernels.linear(x, w, b, "gelu")
    assert calls == ["gelu"]


def test_unknown_activation_is_refused():
    x, w, b = _operands()
    with pytest.raises(ValueError, match="activation"):
        kernels.linear(x, w, b, "swish")


@pytest.mark.parametrize("act", [torch.nn.GELU, torch.nn.ReLU, torch.nn.Tanh])
def test_mlp_block_matches_its_layers(act):
    torch.manual_seed(0)
    mlp = MLPBlock(16, 48, act=act).eval()
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        want = mlp.lin2(mlp.act(mlp.lin1(x)))
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
