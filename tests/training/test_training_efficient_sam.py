"""Training refuses EfficientSAM at the boundary (its training is not implemented)."""

from __future__ import annotations

import pytest

from napari_sam.errors import InvalidInputError
from napari_sam.training.trainer import build_model
from reference_utils import tiny_vit_sam_config


def test_training_refuses_efficient_sam_at_the_boundary():
    with pytest.raises(InvalidInputError, match="EfficientSAM cannot be trained"):
        build_model("efficientsam_ti")
    assert build_model(tiny_vit_sam_config()) is not None  # SAM configs still build
