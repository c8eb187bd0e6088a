"""napari_sam.models."""
