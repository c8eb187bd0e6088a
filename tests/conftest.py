"""Shared pytest set-up.

The reference packages (``segment_anything``, ``mobile_sam``) import a few
functions from torchvision and timm, which are not installed beside this
torch. When they cannot be imported, ``tests/stubs`` (small pure-torch/PIL
stand-ins) is put at the front of ``sys.path``. Real packages that import fine
are imported first, so a stand-in never shadows them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

_STUBS = Path(__file__).resolve().parent / "stubs"


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        # drop half-imported submodules so the stand-in gets a clean slate
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        return False
    return True


_missing = [name for name in ("torchvision", "timm") if not _importable(name)]
if _missing and str(_STUBS) not in sys.path:
    sys.path.insert(0, str(_STUBS))

# make tests/reference_utils.py importable as a plain module from any test file
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(1, _TESTS)

# The npe2 plugin name, which is the distribution name (pyproject's [project] name).
PLUGIN_NAME = "napari-sam-kit"
MANIFEST = Path(__file__).resolve().parents[1] / "napari.yaml"


@pytest.fixture(autouse=True, scope="session")
def _plugin_manifest_from_this_checkout():
    """Make napari find the plugin as ``PLUGIN_NAME`` even when the installed metadata is stale.

    npe2 discovers plugins through the installed distribution's entry points and
    refuses a manifest whose name differs from the distribution's. An editable
    install made before the distribution was renamed (``napari-sam`` ->
    ``napari-sam-kit``) therefore hides the plugin until it is reinstalled
    (``pip install -e . --no-deps``). The widget tests open the plugin by name
    as a user does, so the manifest of this checkout is registered here when
    discovery did not find it; ``tests/widgets/test_manifest.py`` checks the installed
    entry point itself.
    """
    try:
        import npe2
    except ImportError:
        yield
        return
    manager = npe2.PluginManager.instance()
    manager.discover()
    if PLUGIN_NAME not in manager:
        manager.register(npe2.PluginManifest.from_file(MANIFEST))
    yield


@pytest.fixture
def tiny_sam_config():
    """A small ViT SamConfig (128 px input, 8x8 embedding, windowed + global attention)."""
    from reference_utils import tiny_vit_sam_config

    return tiny_vit_sam_config()


@pytest.fixture
def tiny_sam(tiny_sam_config):
    """Our Sam built from ``tiny_sam_config`` with seeded random weights, in eval mode."""
    from reference_utils import build_random_sam

    return build_random_sam(tiny_sam_config, seed=0)
