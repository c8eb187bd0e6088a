"""Test stand-in for the parts of timm used by MobileSAM's TinyViT."""
