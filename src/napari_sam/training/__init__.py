"""napari_sam.training."""
