"""napari_sam.widgets."""
