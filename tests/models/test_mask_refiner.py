"""The mask refiner's inference path (MaskRefiner.infer) against its plain forward."""

from __future__ import annotations

import pytest
import torch

from napari_sam.models.mask_refiner import REFINER_CHANNELS, REFINER_CROP, MaskRefiner


def _random_refiner(widths=(16, 32, 64, 96), seed=0) -> MaskRefiner:
    """Random weights *and* batch-norm statistics (fresh ones fold to the identity)."""
    torch.manual_seed(seed)
    refiner = MaskRefiner(widths)
    with torch.no_grad():
        for module in refiner.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return refiner.eval()


def _inputs(n=3, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(REFINER_CHANNELS), REFINER_CROP, REFINER_CROP, generator=g)
    x[:, 3] = torch.rand(n, REFINER_CROP, REFINER_CROP, generator=g)  # a probability
    return x


@pytest.mark.parametrize("widths", [(16, 32, 64, 96), (4, 8)])
def test_infer_equals_the_eval_mode_forward(widths):
    refiner = _random_refiner(widths)
    x = _inputs()
    with torch.no_grad():
        expected = refiner(x)
    got = refiner.infer(x)
    assert got.shape == expected.shape == (3, 1, REFINER_CROP, REFINER_CROP)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # folded once: a second call reuses the cached weights
    folded = refiner.folded()
    assert refiner.folded()[0][0][0] is folded[0][0][0]
    torch.testing.assert_close(refiner.infer(x), got, atol=0, rtol=0)


def test_infer_follows_weight_changes_and_leaves_training_alone():
    refiner = _random_refiner(seed=0)
    x = _inputs()
    refiner.infer(x)  # cache the folded weights of seed 0
    # new weights loaded into the same tensors (as load_state_dict does)
    refiner.load_state_dict(_random_refiner(seed=5).state_dict())
    with torch.no_grad():
        expected = refiner(x)
    torch.testing.assert_close(refiner.infer(x), expected, atol=1e-4, rtol=1e-4)
    # an optimiser step (in place) is seen too
    refiner.train()
    opt = torch.optim.SGD(refiner.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in refiner.state_dict().items()}
    loss = refiner(x).square().mean()  # train mode: batch statistics, running stats move
    loss.backward()
    opt.step()
    assert refiner.training
    assert not torch.equal(before["enc.0.1.running_mean"], refiner.enc[0][1].running_mean)
    trained = {k: v.clone() for k, v in refiner.state_dict().items()}
    got = refiner.infer(x)  # eval-mode semantics whatever the mode, no side effect
    assert refiner.training
    assert all(torch.equal(trained[k], v) for k, v in refiner.state_dict().items())
    refiner.eval()
    with torch.no_grad():
        expected = refiner(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the cache is not part of the weights
    assert set(refiner.state_dict()) == set(before)


def test_infer_works_on_weights_made_under_inference_mode():
    """Weights created under torch.inference_mode have no version counter."""
    x = _inputs(n=1)
    with torch.inference_mode():
        refiner = MaskRefiner((4, 8)).eval()
        expected = refiner(x)
    torch.testing.assert_close(refiner.infer(x), expected, atol=1e-4, rtol=1e-4)
