"""The package's layering (docs/architecture.md), checked on the import graph.

The graph is read from the source with ``ast``: every ``import`` and ``from ...
import`` anywhere in a module (lazy imports inside functions included) and every
string constant that names a module of the package (the lazy ``_LAZY`` tables of
``napari_sam``, ``napari_sam.engine`` and ``napari_sam.models``). Nothing is
imported, so the check needs neither torch nor napari and takes milliseconds.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "napari_sam"

#: what each part of the package may import from the others (docs/architecture.md,
#: "Layers"). ``_files`` and ``errors`` are leaves every part may use.
LEAVES = {"_files", "errors"}
ALLOWED = {
    "_files": set(),
    "errors": set(),
    "models": LEAVES,
    "engine": LEAVES | {"models"},
    "training": LEAVES | {"models", "engine"},
    "evaluation": LEAVES | {"models", "engine", "training"},
    "widgets": LEAVES | {"models", "engine"},
    "cli": LEAVES | {"models", "engine", "training", "evaluation", "napari_sam"},
    "napari_sam": {"models", "engine"},  # the lazy public API of napari_sam/__init__
    "sample_data": set(),
}
#: GUI toolkits: only ``widgets`` imports them
GUI_MODULES = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt"}
_MODULE_NAME = re.compile(r"napari_sam(\.\w+)+")  # "napari_sam" alone is a name


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, src: Path = SRC) -> set[str]:
    """Absolute names of the modules ``path`` (below ``src``) imports, or names as a string."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            # ``from . import x`` / ``from napari_sam import widgets`` import submodules
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and _MODULE_NAME.fullmatch(node.value)):
            found.add(node.value)
    return found


def part_of(module: str) -> str | None:
    """The part of the package a module belongs to (``engine``, ``cli``, ...); None outside."""
    parts = module.split(".")
    if parts[0] != "napari_sam":
        return None
    if len(parts) == 1:
        return "napari_sam"
    return parts[1] if parts[1] in ALLOWED else None  # ``from napari_sam import __version__``


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


GRAPH = graph()


def test_every_part_is_known():
    """A new top-level module or subpackage gets a row in ALLOWED (and in the docs)."""
    unknown = {part for m in GRAPH if (part := part_of(m)) is None or part not in ALLOWED}
    assert not unknown, f"add {sorted(unknown)} to ALLOWED and to docs/architecture.md"


def test_graph_sees_lazy_and_relative_imports():
    """The reader is not blind: known edges of each kind are found."""
    assert "napari_sam.engine.predictor" in GRAPH["napari_sam"]  # lazy table string
    assert "napari_sam.models.kernels" in GRAPH["napari_sam.engine.predictor"]  # absolute
    assert "napari_sam.training.config" in GRAPH["napari_sam.training.trainer"]  # relative
    assert "argparse" in GRAPH["napari_sam.cli._common"]


def test_dependencies_point_one_way():
    """models -> nothing above; engine -> models; training/evaluation -> engine, models;
    widgets -> engine, models; cli -> everything but widgets."""
    wrong = []
    for module, targets in GRAPH.items():
        here = part_of(module)
        for target in targets:
            there = part_of(target)
            if there is None or there == here:
                continue
            if there not in ALLOWED[here]:
                wrong.append(f"{module} imports {target} ({here} -> {there})")
    assert not wrong, "\n".join(wrong)


def test_models_import_nothing_above_them():
    above = {"engine", "widgets", "cli", "training", "evaluation"}
    wrong = [(m, t) for m, ts in GRAPH.items() if part_of(m) == "models"
             for t in ts if part_of(t) in above]
    assert not wrong


def test_nothing_imports_widgets():
    """Only napari.yaml reaches the widgets (napari imports them through the manifest)."""
    wrong = [(m, t) for m, ts in GRAPH.items() if part_of(m) != "widgets"
             for t in ts if part_of(t) == "widgets"]
    assert not wrong
    manifest = (PACKAGE / "napari.yaml").read_text(encoding="utf-8")
    targets = re.findall(r"python_name:\s*([\w.]+):", manifest)
    assert targets and all(t.startswith(("napari_sam.widgets.", "napari_sam.sample_data"))
                           for t in targets)


def test_only_the_cli_parses_arguments():
    """Library modules hold no argparse code; evaluation and training never import the CLI."""
    argparse_users = sorted(m for m, ts in GRAPH.items() if "argparse" in ts
                            and part_of(m) != "cli")
    assert not argparse_users
    cli_users = sorted(m for m, ts in GRAPH.items() if part_of(m) != "cli"
                       and any(part_of(t) == "cli" for t in ts))
    assert not cli_users


def test_only_widgets_import_gui_toolkits():
    wrong = [(m, t) for m, ts in GRAPH.items() if part_of(m) != "widgets"
             for t in ts if t.split(".")[0] in GUI_MODULES]
    assert not wrong


def test_the_checker_catches_a_violation(tmp_path):
    """A model module importing the engine lazily, inside a function, is an upward edge."""
    fake = tmp_path / "napari_sam" / "models" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..engine import predictor\n    return predictor\n")
    found = imports_of(fake, src=tmp_path)
    assert "napari_sam.engine.predictor" in found
    assert part_of("napari_sam.engine.predictor") not in ALLOWED["models"]


@pytest.mark.parametrize("statement", [
    "import napari_sam",
    "import napari_sam.engine",
    "from napari_sam.models import DEFAULT_MODEL",
])
def test_package_imports_stay_light(statement):
    """The lazy packages import neither torch nor napari (a fresh interpreter)."""
    code = (f"{statement}\nimport sys\n"
            "print(sorted(m for m in ('torch', 'napari', 'qtpy') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
