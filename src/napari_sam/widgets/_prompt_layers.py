"""The interactive widget's own layers: ``SAM points``, ``SAM boxes`` and ``SAM preview``.

:class:`PromptLayers` is their one owner. It

* creates them for an image (copying the image layer's transform), re-fits them when
  the image's transform or dimensionality changes, and brings back a layer the user
  deleted;
* keeps them on top of the layer list (preview, boxes, points; points topmost), also
  when the user adds a layer;
* forgets a layer the user removed (:meth:`ensure` makes it again); :meth:`close` unbinds
  the keys and stops listening, and leaves the layers in the viewer;
* listens to their edits: every finished edit of the points or boxes calls
  ``on_change``; after a new rectangle, the older rectangles of the shown plane are
  removed (only the latest one is a prompt);
* binds the keyboard shortcuts (:mod:`.keys`) on the prompt layers and keeps their help
  line;
* holds the prompt mode (``"points"``/``"box"``) and the polarity of the next points,
  and reads the prompts of the shown plane (:meth:`prompts`).

The widget wires it to its form and its prediction; the rules (reading layers through
their transforms, which rectangles are superseded, which keys do what) are Qt-free in
:mod:`.layers`, :mod:`.prompting` and :mod:`.keys`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from qtpy.QtCore import QTimer

from napari_sam.errors import InvalidInputError
from napari_sam.widgets import layers as L
from napari_sam.widgets import preview as P
from napari_sam.widgets.keys import BOXES, POINTS, KeyAction, keys_for, layer_help
from napari_sam.widgets.prompting import Prompts, superseded_boxes

__all__ = [
    "BOXES_NAME",
    "POINTS_NAME",
    "PREVIEW_NAME",
    "PROMPT_BOX",
    "PROMPT_POINTS",
    "PromptLayers",
]

POINTS_NAME = "SAM points"
BOXES_NAME = "SAM boxes"
PREVIEW_NAME = "SAM preview"
PROMPT_POINTS = "points"
PROMPT_BOX = "box"
# drawing mode of each prompt layer
_DRAW_MODES = {POINTS: "add", BOXES: "add_rectangle"}
# ms between checks whether napari has finished drawing a rectangle
_PRUNE_RETRY_MS = 50


def _edit_finished(event: Any) -> bool:
    """Whether a layer ``data`` event ends an edit (napari also sends "adding" etc. before)."""
    return str(getattr(event, "action", "changed")) not in ("adding", "removing", "changing")


def _key_handler(owner: PromptLayers, key: KeyAction) -> Any:
    """A function for napari's ``bind_key`` that runs ``key``'s action through ``owner``.

    * A named function, not a ``functools.partial``: napari reads ``__name__`` of every
      function bound on the active layer at each key press.
    * A generator (the action runs on press, the release does nothing): napari keeps
      the release callback of the last press of each key, and calls it on the next
      release of that key even when the new press had none. Without a release step
      of our own, Ctrl+Z after Z (pan/zoom) on *SAM points* would run napari's stale
      "restore the previous mode" callback.
    * Holds the owner weakly; does nothing once it is closed.
    """
    ref = weakref.ref(owner)

    def handler(layer: Any) -> Any:
        target = ref()
        if target is not None and not target.closed:
            target.run_key(key.action, key.argument)
        yield

    handler.__name__ = handler.__qualname__ = f"napari_sam_{key.action}"
    return handler


def _weak_callback(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` held weakly when it is a bound method (layers must not keep a widget alive)."""
    if not hasattr(func, "__self__"):
        return func
    ref = weakref.WeakMethod(func)

    def call(*args: Any) -> Any:
        method = ref()
        return None if method is None else method(*args)

    return call


class PromptLayers:
    """Creates, finds, re-fits, raises and removes the prompt and preview layers.

    Args:
      viewer: the napari viewer.
      plane: returns the image layer and the slice index (leading data indices) of the
        shown 2D plane; prompts are read on that plane.
      on_change: called after every finished edit of the points or the boxes.
      on_key: called with ``(action, argument)`` of a shortcut (:class:`.keys.KeyAction`)
        pressed while a prompt layer is selected.
      on_mode: called with ``"points"``/``"box"`` when the user selects a prompt layer.

    Attributes:
      points, boxes, preview: the layers (None until created, or after the user
        removed one).
      positive_next: whether the next clicked point is positive.
      mode: ``"points"`` or ``"box"``: the prompt layer that :meth:`ensure` and
        :meth:`select_prompt_layer` select.
      updating: True while this object adds or moves layers (layer-list handlers of
        the widget ignore those events).
    """

    def __init__(
        self,
        viewer: Any,
        plane: Callable[[], tuple[Image | None, tuple[int, ...]]],
        on_change: Callable[[], None],
        on_key: Callable[[str, int | None], None],
        on_mode: Callable[[str], None],
    ) -> None:
        self.viewer = viewer
        self.points: Points | None = None
        self.boxes: Shapes | None = None
        self.preview: Labels | None = None
        self.positive_next = True
        self.mode = PROMPT_POINTS
        self.updating = False
        self.closed = False
        self._plane = _weak_callback(plane)
        self._on_change = _weak_callback(on_change)
        self._on_key = _weak_callback(on_key)
        self._on_mode = _weak_callback(on_mode)
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self._on_removed)
        viewer.layers.selection.events.active.connect(self._on_active)

    # ----------------------------------------------------------------- finding

    def owned(self) -> list[Any]:
        """The layers still in the viewer, bottom to top (preview, boxes, points)."""
        return [
            x for x in (self.preview, self.boxes, self.points)
            if x is not None and x in self.viewer.layers
        ]

    def missing(self) -> bool:
        """Whether a layer was never created or the user removed it."""
        return None in (self.points, self.boxes, self.preview)

    def owns(self, layer: Any) -> bool:
        """Whether ``layer`` is one of these layers (or named like the preview layer)."""
        return layer is not None and (
            any(layer is x for x in (self.points, self.boxes, self.preview))
            or getattr(layer, "name", None) == PREVIEW_NAME
        )

    @property
    def prompt_layer(self) -> Points | Shapes | None:
        """The prompt layer of the current mode (boxes for ``"box"``, else points)."""
        return self.boxes if self.mode == PROMPT_BOX else self.points

    # ---------------------------------------------------------------- creating

    def ensure(self, image: Image, slice_index: tuple[int, ...]) -> None:
        """Create the missing layers for ``image``, re-fit the others to its transform.

        Layers whose dimensionality no longer matches the image are replaced. A newly
        created prompt layer selects the current prompt layer; otherwise the selected
        layer stays selected. The layers end on top of the layer list.
        """
        if self.closed:
            return
        ndim = len(L.spatial_shape(image))
        transform = {
            "scale": image.scale,
            "translate": image.translate,
            "rotate": image.rotate,
            "shear": image.shear,
            "affine": image.affine.affine_matrix,
        }
        h, w = L.image_plane_shape(image)
        size = max(3.0, max(h, w) / 80)
        layers = self.viewer.layers
        self.updating = True
        try:
            active = layers.selection.active
            created = False
            if self.preview is None or self.preview not in layers:
                from napari.utils.colormaps import DirectLabelColormap

                # holds only the preview's bounding box, placed by its affine
                self.preview = Labels(
                    np.zeros((1, 1), dtype=np.uint8), name=PREVIEW_NAME,
                    colormap=DirectLabelColormap(color_dict=P.preview_colors()),
                    affine=L.plane_affine(image, slice_index),
                )
                self.viewer.add_layer(self.preview)
                created = True
            if self._needs_new(self.boxes, ndim):
                self.boxes = self._add_prompt_layer(self.boxes, BOXES, self._on_boxes_data, Shapes(
                    ndim=ndim, name=BOXES_NAME, edge_color="yellow", face_color="transparent",
                    edge_width=max(1.0, size / 4), **transform,
                ))
                created = True
            else:
                _apply_transform(self.boxes, transform)
            if self._needs_new(self.points, ndim):
                self.points = self._add_prompt_layer(
                    self.points, POINTS, self._on_points_data, Points(
                        np.empty((0, ndim)), ndim=ndim, name=POINTS_NAME,
                        features={L.POSITIVE_FEATURE: np.zeros(0, dtype=bool)},
                        feature_defaults={L.POSITIVE_FEATURE: self.positive_next},
                        face_color=L.POSITIVE_FEATURE,
                        face_color_cycle={True: P.POSITIVE_COLOR, False: P.NEGATIVE_COLOR},
                        border_color="white", size=size, **transform,
                    ))
                created = True
            else:
                _apply_transform(self.points, transform)
                self.points.size = size
            if created:
                layers.selection.active = self.prompt_layer
            elif active is not None and active in layers:
                layers.selection.active = active
        finally:
            self.updating = False
        self.raise_to_top()

    def _needs_new(self, layer: Any, ndim: int) -> bool:
        """Whether ``layer`` is missing, removed, or of another dimensionality."""
        return layer is None or layer not in self.viewer.layers or layer.ndim != ndim

    def _add_prompt_layer(self, old: Any, kind: str, on_data: Callable[..., None],
                          layer: Any) -> Any:
        """Replace ``old`` by ``layer`` (a prompt layer of ``kind``) in its drawing mode,
        listening to its edits, with the keys bound."""
        if old is not None and old in self.viewer.layers:
            self.viewer.layers.remove(old)
        self.viewer.add_layer(layer)
        layer.mode = _DRAW_MODES[kind]
        layer.events.data.connect(on_data)
        self._bind_keys(layer, kind)
        return layer

    def raise_to_top(self) -> None:
        """Move the preview, boxes and points layers to the top (points topmost)."""
        if self.closed:
            return
        layers = self.viewer.layers
        owned = self.owned()
        if not owned or list(layers)[-len(owned):] == owned:
            return
        self.updating = True
        try:
            for layer in owned:
                layers.move(layers.index(layer), len(layers))
        finally:
            self.updating = False

    def show_preview(self, pixels: np.ndarray, affine: np.ndarray) -> None:
        """Put ``pixels`` (an (h, w) preview crop) in the preview layer, placed by ``affine``
        (3 x 3, crop pixels -> world)."""
        layer = self.preview
        if layer is None or layer not in self.viewer.layers:
            return
        layer.data = pixels
        layer.affine = affine

    # ----------------------------------------------------------------- prompts

    def prompts(self) -> Prompts:
        """The prompts of the shown plane: its points and its latest rectangle, as
        (row, col) in the image's data pixels."""
        image, slice_index = self._plane() or (None, ())
        pts = np.zeros((0, 2))
        labels = np.zeros((0,), dtype=np.int32)
        box = None
        if self.points is not None:
            pts, labels = L.points_to_prompts(self.points, image, slice_index)
        if self.boxes is not None:
            boxes = L.shapes_to_boxes(self.boxes, image, slice_index)
            if len(boxes):
                box = boxes[-1]  # the most recent rectangle
        return Prompts.make(pts, labels, box)

    def clear_data(self) -> None:
        """Remove every point and rectangle (of all planes)."""
        if self.points is not None and len(self.points.data):
            self.points.data = np.empty((0, self.points.ndim))
        if self.boxes is not None and self.boxes.nshapes:
            self.boxes.data = []

    def set_polarity(self, positive: bool) -> None:
        """Make the next clicked points positive (True) or negative (False)."""
        self.positive_next = bool(positive)
        if self.points is not None:
            self.points.feature_defaults = {L.POSITIVE_FEATURE: self.positive_next}

    def set_mode(self, mode: str) -> None:
        """Set the prompt mode (``"points"`` or ``"box"``) without selecting a layer."""
        if mode not in (PROMPT_POINTS, PROMPT_BOX):
            raise InvalidInputError(f"Prompt mode must be {PROMPT_POINTS!r} or {PROMPT_BOX!r}.")
        self.mode = mode

    def select_prompt_layer(self, plane_shown: bool) -> None:
        """Select the prompt layer of the current mode, in its drawing mode."""
        layer = self.prompt_layer
        if layer is None or layer not in self.viewer.layers:
            return
        self.restore_draw_modes(plane_shown)
        self.viewer.layers.selection.active = layer

    def restore_draw_modes(self, plane_shown: bool = True) -> None:
        """Put the prompt layers back in their drawing modes (napari switches them to
        pan/zoom in a 3D view); nothing while no 2D plane is shown."""
        if self.closed or not plane_shown:
            return
        for layer, kind in ((self.points, POINTS), (self.boxes, BOXES)):
            if layer is None or layer not in self.viewer.layers:
                continue
            if getattr(layer, "editable", True) and str(layer.mode) == "pan_zoom":
                layer.mode = _DRAW_MODES[kind]

    def prune_boxes(self) -> None:
        """Remove the rectangles of the shown plane that a newer one replaced."""
        layer = self.boxes
        image, slice_index = self._plane() or (None, ())
        if layer is None or image is None or self.closed or layer not in self.viewer.layers:
            return
        if getattr(layer, "_is_creating", False):
            QTimer.singleShot(_PRUNE_RETRY_MS, self.prune_boxes)
            return
        old = superseded_boxes(L.shapes_on_plane(layer, image, slice_index).tolist())
        if old:
            layer.selected_data = set(old)
            layer.remove_selected()

    # ------------------------------------------------------------------ events

    def _on_points_data(self, event: Any = None) -> None:
        if _edit_finished(event) and not self.closed:
            self._on_change()

    def _on_boxes_data(self, event: Any = None) -> None:
        if str(getattr(event, "action", "changed")) == "added":
            # once napari has finished drawing: only the latest rectangle is a prompt
            QTimer.singleShot(0, self.prune_boxes)
        self._on_points_data(event)

    def _on_inserted(self, event: Any) -> None:
        if self.updating or self.closed:
            return
        if event.value not in self.owned():
            # a new image (or any layer) goes on top: put these layers back above it,
            # once napari has finished inserting it
            QTimer.singleShot(0, self.raise_to_top)

    def _on_removed(self, event: Any) -> None:
        layer = event.value
        if layer is self.points:
            self.points = None
        elif layer is self.boxes:
            self.boxes = None
        elif layer is self.preview:
            self.preview = None

    def _on_active(self, event: Any = None) -> None:
        from napari_sam.widgets._common import unwrap

        active = unwrap(self.viewer.layers.selection.active)
        if self.closed or active is None:
            return
        if active is self.points:
            self.mode = PROMPT_POINTS
            self._on_mode(PROMPT_POINTS)
        elif active is self.boxes:
            self.mode = PROMPT_BOX
            self._on_mode(PROMPT_BOX)

    # -------------------------------------------------------------------- keys

    def run_key(self, action: str, argument: int | None) -> None:
        """Run a shortcut's action (called by the bound key handlers)."""
        self._on_key(action, argument)

    def _bind_keys(self, layer: Any, kind: str) -> None:
        for key in keys_for(kind):
            layer.bind_key(key.key, _key_handler(self, key), overwrite=True)
        # napari rewrites a layer's help line on every mode change, from its own key
        # table (which advertises digits the plugin rebinds): keep ours
        text = layer_help(kind)
        layer.help = text
        ref = weakref.ref(self)

        def keep_help(event: Any = None, layer: Any = layer, text: str = text) -> None:
            owner = ref()
            if owner is not None and not owner.closed and layer.help != text:
                layer.help = text

        layer.events.help.connect(keep_help)

    def _unbind_keys(self) -> None:
        for layer, kind in ((self.points, POINTS), (self.boxes, BOXES)):
            if layer is None:
                continue
            for key in keys_for(kind):
                with contextlib.suppress(Exception):
                    layer.bind_key(key.key, None)

    # ------------------------------------------------------------------- close

    def close(self) -> None:
        """Unbind the keys and stop listening to the viewer (the layers stay)."""
        if self.closed:
            return
        self._unbind_keys()
        self.closed = True
        events = self.viewer.layers.events
        for sig, slot in (
            (events.inserted, self._on_inserted),
            (events.removed, self._on_removed),
            (self.viewer.layers.selection.events.active, self._on_active),
        ):
            with contextlib.suppress(Exception):
                sig.disconnect(slot)


def _apply_transform(layer: Any, transform: dict[str, Any]) -> None:
    for key, value in transform.items():
        setattr(layer, key, value)
