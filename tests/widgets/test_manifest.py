"""The npe2 manifest (napari.yaml): valid, importable, packaged; the sample data loads.

The plugin's name is its distribution's, ``napari-sam-kit`` (``napari-sam`` on the
package index is an unrelated plugin). The checks read this checkout's files; the one
that needs the installed distribution's entry point says how to refresh a stale install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import pytest

npe2 = pytest.importorskip("npe2")
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DIST = "napari-sam-kit"  # the distribution, hence the npe2 plugin name
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def manifest():
    return npe2.PluginManifest.from_file(ROOT / "napari.yaml")


def test_plugin_name_is_the_distribution_name(manifest):
    """pyproject's name, its napari.manifest entry point and the manifest agree on DIST;
    the package, the command and the menu names keep theirs."""
    project = PYPROJECT["project"]
    assert project["name"] == DIST
    assert project["entry-points"]["napari.manifest"] == {DIST: "napari_sam:napari.yaml"}
    assert project["scripts"] == {"napari-sam": "napari_sam.cli:main"}
    assert manifest.name == DIST
    assert all(cmd.id.startswith(DIST + ".") for cmd in manifest.contributions.commands)


def test_installed_entry_point_finds_the_manifest():
    """The installed distribution's entry point leads npe2 to this manifest (as napari
    discovers plugins)."""
    owners = metadata.packages_distributions().get("napari_sam", [])
    if DIST not in owners:
        pytest.skip(f"napari_sam is installed as {owners} (metadata from before the rename to "
                    f"{DIST}); refresh it: pip install -e {ROOT} --no-deps")
    installed = npe2.PluginManifest.from_distribution(DIST)
    assert installed.name == DIST
    assert {c.id for c in installed.contributions.commands} == {
        c.id for c in npe2.PluginManifest.from_file(ROOT / "napari.yaml").contributions.commands}


def test_manifest_is_valid(manifest):
    assert manifest.display_name == "Segment Anything"
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert widgets == {"Segment Anything", "Segment Everything"}
    samples = {s.display_name for s in manifest.contributions.sample_data}
    assert samples == {"Nuclei (DSB2018)"}


def test_every_python_name_resolves(manifest):
    from npe2.manifest.utils import import_python_name

    commands = manifest.contributions.commands
    assert commands
    for cmd in commands:
        obj = import_python_name(cmd.python_name)
        assert callable(obj), cmd.python_name
    manifest.validate_imports()


def test_sample_loads(manifest):
    from npe2.manifest.utils import import_python_name

    (sample,) = manifest.contributions.sample_data
    cmd = next(c for c in manifest.contributions.commands if c.id == sample.command)
    layers = import_python_name(cmd.python_name)()
    assert len(layers) == 1
    data, kwargs = layers[0]
    assert data.shape == (520, 696) and data.dtype == np.uint8
    assert data.std() > 5  # a real image, not a blank
    assert kwargs["name"] == "nuclei"
    assert "CC0" in kwargs["metadata"]["attribution"]


def test_installed_package_contains_manifest():
    path = resources.files("napari_sam") / "napari.yaml"
    assert path.is_file()
    assert f"name: {DIST}\n" in path.read_text()


@pytest.mark.slow
def test_wheel_contains_manifest_and_data(tmp_path):
    """Build a wheel from a copy of the sources: napari.yaml is a real file inside it."""
    src = tmp_path / "src_copy"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "napari.yaml", src)
    for extra in ("README.md", "LICENSE"):
        if (ROOT / extra).exists():
            shutil.copy(ROOT / extra, src)
    shutil.copytree(
        ROOT / "src" / "napari_sam",
        src / "src" / "napari_sam",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"),
    )
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(f"could not build a wheel here: {proc.stderr[-500:]}")
    (whl,) = out.glob("*.whl")
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        assert "napari_sam/napari.yaml" in names
        assert f"name: {DIST}\n" in zf.read("napari_sam/napari.yaml").decode()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert f"\nName: {DIST}\n" in zf.read(meta).decode()
        assert "napari_sam/data/nuclei.png" in names
        eps = next(n for n in names if n.endswith("entry_points.txt"))
        entry_points = zf.read(eps).decode()
        assert f"{DIST} = napari_sam:napari.yaml" in entry_points
        assert "napari-sam = napari_sam.cli:main" in entry_points
