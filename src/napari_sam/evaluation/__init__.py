"""napari_sam.evaluation."""
