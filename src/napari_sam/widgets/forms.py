"""Parameter forms generated from settings dataclasses (Qt-free; the widget builds the boxes).

The Segment Everything widget's AMG rows come from
:class:`~napari_sam.engine.everything_settings.EverythingSettings` (the fields the CLI
turns into options), its AIS rows from :class:`~napari_sam.engine.ais.AisSettings`: one
:class:`NumberField` per field, with the field's range, step and help. Values set from a
script are checked by the settings themselves (the CLI's check), so the widget refuses
what the CLI refuses, with the same message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from napari_sam.engine.ais import AisSettings
from napari_sam.engine.everything_settings import (
    SAM_THRESHOLDS,
    EverythingSettings,
    describe_range,
)
from napari_sam.errors import InvalidInputError

__all__ = [
    "ADVANCED_AMG_FIELDS",
    "FLOAT_DECIMALS",
    "NumberField",
    "ais_fields",
    "amg_fields",
    "check_ais_params",
    "check_amg_params",
]

#: decimals shown by float boxes
FLOAT_DECIMALS = 2
#: largest value of a box whose field has no upper bound (a QSpinBox holds 32-bit ints)
UNBOUNDED_INT = 2**31 - 1
UNBOUNDED_FLOAT = 1e6
#: AMG fields shown only when "more parameters" is ticked (SAM rarely needs them changed)
ADVANCED_AMG_FIELDS = frozenset({
    "stability_score_offset", "crop_nms_thresh", "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
})


@dataclass(frozen=True)
class NumberField:
    """One numeric row of a form: a spin box's kind, range, step, value and tooltip."""

    name: str
    kind: type  # int or float
    default: int | float
    minimum: int | float
    maximum: int | float  # the box's maximum (an open bound is just below the limit)
    step: int | float
    tooltip: str
    advanced: bool = False

    @property
    def label(self) -> str:
        """The row's label: the name with spaces."""
        return self.name.replace("_", " ")

    def shown_default(self) -> int | float:
        """The default as the box holds it (floats rounded to :data:`FLOAT_DECIMALS`)."""
        return self.kind(self.default) if self.kind is int else round(self.default,
                                                                       FLOAT_DECIMALS)


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


def amg_fields() -> list[NumberField]:
    """The AMG form: one row per numeric :class:`EverythingSettings` field (the CLI's
    options), in order, with the settings' range and help.

    Thresholds whose default is None (the model decides) start at SAM's values; the
    widget sets the model's recommendation when a model is picked.
    """
    rows = []
    for f in EverythingSettings.cli_fields():
        meta = f.metadata
        kind = meta["kind"]
        default = SAM_THRESHOLDS.get(f.name, f.default)
        lo = meta["min"]
        if meta["max"] is None:
            hi = UNBOUNDED_INT if kind is int else UNBOUNDED_FLOAT
        elif meta.get("max_open"):
            hi = meta["max"] - (1 if kind is int else 10.0**-FLOAT_DECIMALS)
        else:
            hi = meta["max"]
        shown = (f"the model's recommendation, else {default:g}" if f.name in SAM_THRESHOLDS
                 else f"{default:g}")
        tip = f"{_sentence(meta['help'])} Valid: {describe_range(meta)}; default: {shown}."
        rows.append(NumberField(f.name, kind, default, kind(lo), kind(hi), kind(meta["step"]),
                                tip, f.name in ADVANCED_AMG_FIELDS))
    return rows


def ais_fields() -> list[NumberField]:
    """The AIS form: one row per :class:`AisSettings` field (probabilities in [0, 1], sizes
    in pixels >= 0), with the field's help."""
    rows = []
    for f in dataclasses.fields(AisSettings):
        kind = int if f.type in (int, "int") else float
        high, step = (1_000_000, 5) if kind is int else (1.0, 0.05)
        tip = _sentence(str(f.metadata.get("help", f.name.replace("_", " "))))
        rows.append(NumberField(f.name, kind, f.default, kind(0), kind(high), kind(step), tip))
    return rows


def check_amg_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (AMG keywords) checked by :meth:`EverythingSettings.from_kwargs`, the
    check the CLI and the generator use; returns them unchanged.

    Raises:
      InvalidInputError: a value out of range or a combination the generator refuses
        (e.g. too many prompts), with the settings' one-line message.
    """
    EverythingSettings.from_kwargs(params)
    return dict(params)


def check_ais_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` checked by :class:`AisSettings` (the CLI's check); returns them unchanged.

    Raises:
      InvalidInputError: a threshold outside [0, 1], a negative size or an unknown name.
    """
    try:
        AisSettings(**params)
    except TypeError as err:  # an unknown keyword
        raise InvalidInputError(f"Unknown AIS parameter: {err}.") from None
    return dict(params)
