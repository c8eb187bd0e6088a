"""Stand-in for ``timm.models``."""
