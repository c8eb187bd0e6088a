"""napari_sam.engine."""
