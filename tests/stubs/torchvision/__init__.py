"""Test stand-in for the parts of torchvision used by the reference SAM packages."""

__version__ = "0.0.0+napari_sam_stub"
