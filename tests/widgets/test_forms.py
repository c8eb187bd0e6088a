"""The parameter forms' rows, generated from the settings dataclasses (no Qt needed)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from napari_sam.engine.ais import AisSettings
from napari_sam.engine.everything_settings import (
    SAM_THRESHOLDS,
    EverythingSettings,
    describe_range,
)
from napari_sam.errors import InvalidInputError
from napari_sam.widgets.forms import (
    ADVANCED_AMG_FIELDS,
    UNBOUNDED_INT,
    ais_fields,
    amg_fields,
    check_ais_params,
    check_amg_params,
)


def test_every_numeric_everything_setting_is_a_row_with_its_range_and_help():
    rows = {row.name: row for row in amg_fields()}
    settings = EverythingSettings.cli_fields()
    assert list(rows) == [f.name for f in settings]  # the CLI's options, in order
    for f in settings:
        meta, row = f.metadata, rows[f.name]
        assert row.kind is meta["kind"]
        assert row.minimum == meta["min"]
        if meta["max"] is None:
            assert row.maximum >= 1_000_000
        elif meta["max_open"]:
            assert row.minimum < row.maximum < meta["max"]
        else:
            assert row.maximum == meta["max"]
        assert row.step == meta["step"]
        assert meta["help"][1:] in row.tooltip and describe_range(meta) in row.tooltip
        assert row.default == SAM_THRESHOLDS.get(f.name, f.default)
        assert row.advanced == (f.name in ADVANCED_AMG_FIELDS)


def test_the_old_gui_steps_are_the_settings_steps():
    rows = {row.name: row for row in amg_fields()}
    assert rows["points_per_batch"].step == 16 and rows["min_mask_region_area"].step == 10
    assert rows["min_mask_region_area"].maximum == UNBOUNDED_INT
    assert rows["pred_iou_thresh"].step == pytest.approx(0.01)


def test_ais_rows_follow_ais_settings():
    rows = {row.name: row for row in ais_fields()}
    assert list(rows) == [f.name for f in dataclasses.fields(AisSettings)]
    assert rows["min_size"].kind is int and rows["foreground_threshold"].maximum == 1.0
    assert rows["center_threshold"].tooltip.startswith("Seeds")


def test_shown_default_rounds_floats_as_the_box_does():
    row = next(r for r in amg_fields() if r.name == "crop_overlap_ratio")
    assert row.default == pytest.approx(512 / 1500)
    assert row.shown_default() == 0.34


def _cli_message(option: str, value: str) -> str:
    """The message of `napari-sam everything OPTION VALUE` (parsed as the CLI parses)."""
    from napari_sam.cli._common import UsageError
    from napari_sam.cli.everything import add_generator_options, generator_kwargs

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_b")
    add_generator_options(parser)
    with pytest.raises(UsageError) as info:
        generator_kwargs(parser.parse_args([option, value]))
    return str(info.value)


@pytest.mark.parametrize(("name", "value"), [
    ("points_per_side", 300), ("pred_iou_thresh", 1.5), ("crop_overlap_ratio", 1.0),
    ("crop_n_layers", 5), ("min_mask_region_area", -1),
])
def test_out_of_range_values_are_refused_with_the_clis_message(name, value):
    with pytest.raises(InvalidInputError) as info:
        check_amg_params({name: value})
    option = "--" + name.replace("_", "-")
    assert str(info.value) == _cli_message(option, str(value)).replace(option, name)


def test_combinations_are_refused_as_the_generator_refuses_them():
    with pytest.raises(InvalidInputError, match="prompts per image"):
        check_amg_params({"points_per_side": 256, "crop_n_layers": 4})
    assert check_amg_params({"points_per_side": 16}) == {"points_per_side": 16}


def test_ais_values_are_checked_by_ais_settings():
    with pytest.raises(InvalidInputError, match=r"in \[0, 1\]"):
        check_ais_params({"center_threshold": 2.0})
    with pytest.raises(InvalidInputError, match="Unknown AIS parameter"):
        check_ais_params({"nope": 1})
    assert check_ais_params({"min_size": 3}) == {"min_size": 3}
