"""The interactive widget's keyboard shortcuts as data (no Qt, no napari).

One table, :data:`KEYS`, drives the bindings on the two prompt layers, the help
line napari shows for them and the widget's help label, so the three cannot
disagree. Keys are written as napari's ``bind_key`` reads them.

The plugin's keys replace napari's own on the prompt layers only where they share
a key: on *SAM points* 1 (delete selected points), 2 (add mode) and 3 (select
mode) pick candidates instead; on *SAM boxes* 1/X (remove vertex), 2 (insert
vertex) and 3 (delete selected shapes). G (propagate the object through the stack)
is free on both layers in napari (Ctrl+G, the grid, is another key). napari's
letter keys for those modes
(P, S, Z, R, Delete) are untouched, and :func:`layer_help` advertises them instead
of the shadowed digits.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KEYS", "POINTS", "BOXES", "KeyAction", "keys_for", "layer_help", "widget_help"]

POINTS = "points"
BOXES = "boxes"


@dataclass(frozen=True)
class KeyAction:
    """One shortcut.

    Attributes:
      key: napari key name (``"T"``, ``"Enter"``, ``"Control-Z"``...).
      action: the widget action it runs (see ``SegmentAnythingWidget._run_key_action``).
      argument: the action's argument (the candidate index for ``"candidate"``).
      layers: on which prompt layers it is bound (:data:`POINTS`, :data:`BOXES`).
    """

    key: str
    action: str
    argument: int | None = None
    layers: tuple[str, ...] = (POINTS, BOXES)


KEYS: tuple[KeyAction, ...] = (
    KeyAction("T", "toggle_polarity", layers=(POINTS,)),
    KeyAction("1", "candidate", 0),
    KeyAction("2", "candidate", 1),
    KeyAction("3", "candidate", 2),
    KeyAction("C", "commit"),
    KeyAction("Enter", "commit", layers=(POINTS,)),
    KeyAction("X", "clear"),
    KeyAction("Escape", "clear", layers=(POINTS,)),
    KeyAction("G", "propagate"),
    KeyAction("Control-Z", "undo"),
    KeyAction("Control-Shift-Z", "redo"),
)


def keys_for(layer_kind: str) -> list[KeyAction]:
    """The shortcuts bound on the ``layer_kind`` prompt layer."""
    return [k for k in KEYS if layer_kind in k.layers]


def layer_help(layer_kind: str) -> str:
    """napari's help line for a prompt layer: the plugin's keys, then napari's that still work."""
    if layer_kind == POINTS:
        sam = "T: +/- polarity, 1/2/3: candidate, C/Enter: commit, X/Esc: clear, G: propagate"
        napari = "P: add points, S: select, Z: pan/zoom, Delete: remove selected points"
    else:
        sam = "drag: box, 1/2/3: candidate, C: commit, X: clear, G: propagate"
        napari = "R: rectangle, S: select, Z: pan/zoom, Delete: remove selected boxes"
    return f"SAM {sam}, Ctrl+Z/Ctrl+Shift+Z: undo/redo commit | napari {napari}"


def widget_help() -> str:
    """The help label under the widget's buttons."""
    return (
        "With SAM points or SAM boxes selected: T toggles +/-, 1/2/3 picks a candidate, "
        "C (Enter) commits, X (Esc) clears, G propagates through the stack, Ctrl+Z undoes the "
        "last commit."
    )
