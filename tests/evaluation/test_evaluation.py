"""Tests of napari_sam.evaluation: metrics, interactive protocol, evaluate()."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from napari_sam.errors import InvalidInputError
from napari_sam.evaluation import (
    evaluate,
    format_results,
    iou_matrix,
    mask_iou,
    matching_metrics,
    mean_metrics,
    write_results,
)
from napari_sam.evaluation.everything import evaluate_image_everything
from napari_sam.evaluation.interactive import evaluate_image_interactive
from napari_sam.evaluation.metrics import match_counts
from napari_sam.training.prompts import innermost_points

# ------------------------------------------------------------------------ metrics


def _labels() -> np.ndarray:
    lab = np.zeros((40, 40), np.int32)
    lab[0:10, 0:10] = 1  # 100 px
    lab[20:30, 0:10] = 2  # 100 px
    lab[20:30, 20:40] = 3  # 200 px
    return lab


def test_mask_iou_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert mask_iou(a, b) == 1.0
    a[:5] = True
    b[:, :5] = True
    assert mask_iou(a, b) == pytest.approx(25 / 75)
    assert mask_iou(a, a) == 1.0
    with pytest.raises(InvalidInputError):
        mask_iou(a, np.zeros((3, 3), bool))


def test_mask_iou_has_one_owner_and_one_meaning_for_empty_masks():
    """Issue 14 item 4: the engine's copy gave 0 for two empty masks, evaluation's 1."""
    from napari_sam.engine import masks
    from napari_sam.evaluation import interactive
    from napari_sam.evaluation.metrics import paired_mask_iou

    assert not hasattr(masks, "mask_iou") and not hasattr(interactive, "masks_iou")
    pred = np.zeros((3, 6, 6), bool)
    gt = np.zeros((3, 6, 6), bool)
    pred[1, :3], gt[1, :, :3] = True, True  # 9 / 27
    pred[2], gt[2, :2] = True, True  # 12 / 36
    got = paired_mask_iou(pred, gt)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, [1.0, 9 / 27, 12 / 36])  # both empty: 1
    assert list(got) == pytest.approx([mask_iou(p, g) for p, g in zip(pred, gt, strict=True)])


def test_iou_matrix_labels_and_overlapping_masks():
    gt = _labels()
    pred = [gt == 1, (gt == 1) | (gt == 2), np.zeros_like(gt, bool)]
    iou = iou_matrix(gt, pred)
    assert iou.shape == (3, 3)
    np.testing.assert_allclose(iou[:, 0], [1, 0, 0])
    np.testing.assert_allclose(iou[:, 1], [0.5, 0.5, 0])
    np.testing.assert_allclose(iou[:, 2], 0)
    # a label image as prediction: columns follow its sorted ids
    pred_lab = np.where(gt == 3, 7, np.where(gt == 1, 2, 0))
    np.testing.assert_allclose(iou_matrix(gt, pred_lab), [[1, 0], [0, 0], [0, 1]])


def test_matching_known_counts():
    gt = _labels()
    exact = gt == 1
    partial = np.zeros_like(exact)
    partial[20:30, 0:6] = True
    partial[20:22, 6] = True  # IoU 0.62 with object 2
    spurious = np.zeros_like(exact)
    spurious[32:40, 32:40] = True
    m = matching_metrics(gt, [exact, partial, spurious])
    assert (m["tp50"], m["fp50"], m["fn50"]) == (2, 1, 1)
    assert (m["tp75"], m["fp75"], m["fn75"]) == (1, 2, 2)
    assert m["ap50"] == pytest.approx(2 / 4)
    assert m["ap75"] == pytest.approx(1 / 5)
    assert m["precision50"] == pytest.approx(2 / 3)
    assert m["recall50"] == pytest.approx(2 / 3)
    assert m["f1_50"] == pytest.approx(4 / 6)
    # DSB: thresholds 0.5..0.95; the partial match counts at 0.5, 0.55 and 0.6
    expected = (3 * (2 / 4) + 7 * (1 / 5)) / 10
    assert m["ap_dsb"] == pytest.approx(expected)
    # duplicates of one object count once
    dup = matching_metrics(gt, [exact, exact])
    assert (dup["tp50"], dup["fp50"], dup["fn50"]) == (1, 1, 2)
    assert (dup["tp75"], dup["fp75"]) == (1, 1)
    # nothing to find and nothing found is perfect
    empty = matching_metrics(np.zeros((5, 5), np.int32), [])
    assert empty["ap50"] == 1.0 and empty["recall50"] == 1.0 and empty["precision50"] == 1.0
    # predicting nothing on an image with objects is not precise
    none = matching_metrics(gt, [])
    assert (none["ap50"], none["precision50"], none["recall50"]) == (0.0, 0.0, 0.0)


def test_match_counts_low_threshold_is_one_to_one():
    iou = np.array([[0.4, 0.35], [0.0, 0.3]])
    assert match_counts(iou, 0.3) == (2, 0, 0)
    assert match_counts(iou, 0.38) == (1, 1, 1)
    assert match_counts(np.zeros((0, 2)), 0.5) == (0, 2, 0)


def test_mean_metrics_sums_counts():
    a = {"ap50": 1.0, "tp50": 2.0}
    b = {"ap50": 0.5, "tp50": 3.0}
    assert mean_metrics([a, b]) == {"ap50": 0.75, "tp50": 5.0}


def test_innermost_point_selection():
    lab = _labels()
    pts = innermost_points(lab[None] == np.array([1, 3])[:, None, None])
    # 10x10 block at rows 0..9: ties broken in raster order -> (4, 4)
    assert pts[0].tolist() == [4, 4]
    assert lab[tuple(pts[1])] == 3


# -------------------------------------------------------------------- interactive


class OraclePredictor:
    """Returns the ground-truth object under the last positive click or the box centre.

    ``after`` > 1 makes it return only the object's left half until it has seen
    that many points.
    """

    def __init__(self, labels: np.ndarray, mode: str = "oracle", after: int = 1) -> None:
        self.labels = labels
        self.mode = mode
        self.after = after
        self.calls = []

    def set_image(self, image):
        self.image = image

    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask=True):
        H, W = self.labels.shape
        if points is not None:
            pts = np.asarray(points)
            where = [tuple(p[0].astype(int)) for p in pts]
            n_points = pts.shape[1]
        else:
            b = np.asarray(box)
            where = [(int((r0 + r1) / 2), int((c0 + c1) / 2)) for r0, c0, r1, c1 in b]
            n_points = 1
        self.calls.append((n_points, mask_input is not None, multimask))
        c = 3 if multimask else 1
        masks = np.zeros((len(where), c, H, W), bool)
        for i, rc in enumerate(where):
            obj = self.labels == self.labels[rc]
            if self.mode == "empty":
                continue
            if n_points < self.after:
                obj = obj & (np.arange(W) < (np.flatnonzero(obj.any(0)).mean()))[None]
            masks[i, c - 1] = obj  # the best mask is the last output
        scores = np.tile(np.arange(c, dtype=np.float32), (len(where), 1))
        logits = np.zeros((len(where), c, 8, 8), np.float32)
        return SimpleNamespace(masks=masks, scores=scores, logits=logits)


def test_interactive_oracle_is_perfect_and_empty_is_zero():
    lab = _labels()
    lab[39, 39] = 9  # a 1-pixel object: skipped (min_area)
    res = evaluate_image_interactive(OraclePredictor(lab), np.zeros((40, 40)), lab, n_clicks=2)
    assert res["ids"].tolist() == [1, 2, 3]
    assert res["point_iou"].shape == (3, 3)
    np.testing.assert_allclose(res["point_iou"], 1.0)
    np.testing.assert_allclose(res["box_iou"], 1.0)
    empty = OraclePredictor(lab, "empty")
    res = evaluate_image_interactive(empty, None, lab, n_clicks=2)
    np.testing.assert_allclose(res["point_iou"], 0.0)
    np.testing.assert_allclose(res["box_iou"], 0.0)
    # empty predictions get a positive correction click on every round
    assert [c[0] for c in empty.calls] == [1, 2, 3, 1]
    assert empty.calls[1] == (2, True, False)  # mask fed back, single output


def test_interactive_correction_click_improves():
    lab = _labels()
    pred = OraclePredictor(lab, after=2)
    res = evaluate_image_interactive(pred, None, lab, n_clicks=2, box=False)
    assert (res["point_iou"][:, 0] < 0.75).all()
    np.testing.assert_allclose(res["point_iou"][:, 1:], 1.0)
    assert np.isnan(res["box_iou"]).all()
    # objects done after the first correction get no more clicks
    assert [c[0] for c in pred.calls] == [1, 2]


def test_everything_scoring_with_fake_generator():
    lab = _labels()

    class Gen:
        def generate(self, image):
            return [{"segmentation": lab == 1}, {"segmentation": lab == 3}]

    m = evaluate_image_everything(Gen(), np.zeros((40, 40)), lab)
    assert (m["tp50"], m["fp50"], m["fn50"]) == (2, 0, 1)
    assert m["ap50"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------ evaluate


def test_evaluate_end_to_end(tmp_path, tiny_sam):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(2):
        lab = _labels()
        img = np.where(lab > 0, 200, 20).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"a{i}.png")
        Image.fromarray(lab.astype(np.uint16)).save(root / "labels" / f"a{i}.png")
    (tmp_path / "ids.json").write_text(json.dumps({"train": ["a0"], "val": ["a1"]}))
    seen = []
    res = evaluate(
        tiny_sam,
        root,
        ids=tmp_path / "ids.json",
        n_clicks=1,
        everything=True,
        everything_kwargs={
            "points_per_side": 4,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
        },
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(1, 1)]
    assert res["n_images"] == 1 and res["n_objects"] == 3
    assert [e["id"] for e in res["per_image"]] == ["a1"]
    assert len(res["interactive"]["point_miou"]) == 2
    for v in [*res["interactive"]["point_miou"], res["interactive"]["box_miou"]]:
        assert 0.0 <= v <= 1.0
    for key in ("ap50", "ap75", "ap_dsb", "precision50", "recall50", "f1_50"):
        assert 0.0 <= res["everything"][key] <= 1.0
    text = format_results(res)
    assert "mIoU box" in text and "AP@0.5" in text
    res["interactive"]["box_miou"] = float("nan")
    path = write_results(res, tmp_path / "out" / "r.json")
    back = json.loads(path.read_text())
    assert back["interactive"]["box_miou"] is None and back["n_objects"] == 3


def test_evaluate_cli_arguments():
    import argparse

    from napari_sam.cli.evaluate import add_evaluate_arguments

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(["d", "-m", "x.safetensors", "--no-everything", "--n-clicks", "5"])
    assert (args.data, args.model, args.everything, args.n_clicks) == (
        "d",
        "x.safetensors",
        False,
        5,
    )
    # everything-mode options are the CLI's; only the given ones reach the generator
    args = parser.parse_args(["d", "--crop-n-layers", "1", "--pred-iou-thresh", "0.8"])
    assert (args.crop_n_layers, args.pred_iou_thresh, args.points_per_side) == (1, 0.8, None)


def test_box_prompt_of_one_pixel_thin_object(tiny_sam):
    """A one-pixel-wide object has a zero-area tight box: it gets one pixel of extent."""
    from napari_sam.engine.predictor import Predictor

    lab = np.zeros((48, 64), np.int32)
    lab[10:30, 20] = 1  # a vertical line, 1 pixel wide
    lab[35:40, 40:50] = 2
    image = (lab > 0).astype(np.uint8) * 200
    res = evaluate_image_interactive(Predictor(tiny_sam), image, lab, n_clicks=0, min_area=5)
    assert res["ids"].tolist() == [1, 2]
    assert np.isfinite(res["box_iou"]).all()


# ------------------------------------------------------------------------ issue 13: bad input


def _tiny_dataset(root):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    lab = _labels()
    Image.fromarray(np.where(lab > 0, 200, 20).astype(np.uint8)).save(root / "images" / "a0.png")
    Image.fromarray(lab.astype(np.uint16)).save(root / "labels" / "a0.png")
    return root


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": []}, "lists no"),
        ({"ids": "EMPTY"}, "lists no"),
        ({"ids": "BADTYPE"}, '"val" must be a list of image ids'),
        ({"ids": "BROKEN"}, "invalid JSON"),
        ({"max_images": 0}, "max_images must be an integer >= 1"),
        ({"n_clicks": -3}, "n_clicks must be an integer >= 0"),
    ],
)
def test_evaluate_refuses_runs_that_would_give_nan(tmp_path, tiny_sam, kwargs, match):
    """Review D10: an empty ids list or --max-images 0 gave NaN metrics and exit code 0."""
    root = _tiny_dataset(tmp_path / "data")
    files = {"EMPTY": "[]", "BADTYPE": '{"val": 5}', "BROKEN": "{not json"}
    if isinstance(kwargs.get("ids"), str):
        (tmp_path / "ids.json").write_text(files[kwargs["ids"]])
        kwargs = {"ids": tmp_path / "ids.json"}
    with pytest.raises(InvalidInputError, match=match):
        evaluate(tiny_sam, root, everything=False, **kwargs)


def test_write_results_without_replace_keeps_a_file(tmp_path):
    (tmp_path / "r.json").write_text("precious")
    with pytest.raises(FileExistsError):
        write_results({"n_images": 1}, tmp_path / "r.json", replace=False)
    assert (tmp_path / "r.json").read_text() == "precious"
    write_results({"n_images": 1}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"n_images": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# ------------------------------------------------- issue 15.3: tiles for large images


def test_evaluate_tiling_option_reaches_the_predictor(tmp_path, tiny_sam):
    """``tiling="auto"`` (the default, as the widget) predicts a large image's prompts in
    native-scale tiles; "off" on the whole image at model scale; both are recorded."""
    import argparse

    from napari_sam.cli.evaluate import add_evaluate_arguments
    from napari_sam.engine.predictor import Predictor

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rr, cc = np.mgrid[:300, :300]
    lab = np.zeros((300, 300), np.uint16)
    for k, (r, c) in enumerate(((60, 70), (150, 160), (240, 90), (100, 250)), start=1):
        lab[(rr - r) ** 2 + (cc - c) ** 2 < 12 ** 2] = k
    image = np.where(lab > 0, 200, 30).astype(np.uint8)  # 300 px > 2 x the 128 px input
    Image.fromarray(image).save(root / "images" / "big.png")
    Image.fromarray(lab).save(root / "labels" / "big.png")

    got = {mode: evaluate(tiny_sam, root, everything=False, n_clicks=0, tiling=mode)
           for mode in ("auto", "off")}
    for mode, res in got.items():
        assert res["settings"]["tiling"] == mode
        direct = evaluate_image_interactive(Predictor(tiny_sam, tiling=mode), image, lab,
                                            n_clicks=0)
        assert res["interactive"]["point_miou"][0] == pytest.approx(
            float(np.nanmean(direct["point_iou"][:, 0])))
    assert got["auto"]["interactive"]["point_miou"] != got["off"]["interactive"]["point_miou"]
    with pytest.raises(InvalidInputError, match="tiling must be one of"):
        evaluate(tiny_sam, root, everything=False, tiling="on")

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    assert parser.parse_args(["d"]).tiling == "auto"
    assert parser.parse_args(["d", "--tiling", "off"]).tiling == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["d", "--tiling", "on"])
