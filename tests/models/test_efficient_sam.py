"""EfficientSAM: our models against the reference implementation, checkpoints, and the engine.

The reference modeling code (github.com/yformer/EfficientSAM, Apache-2.0) lives
outside the repository, at ``../shared/references/efficient_sam`` from the
repository root (in CI too). A git worktree finds it beside its main checkout.
Both codes build the same reduced configuration (128 px input, 2 encoder
blocks, narrow decoder) and get the same random weights; the reference gets the
uint8 RGB image our normalisation produced (as 0..1 floats, at the original
size: it stretches and normalises itself) and the same prompts in its (x, y)
order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.predictor import Predictor
from napari_sam.engine.session import InteractiveSession, limit_prompt_points
from napari_sam.errors import InvalidInputError
from napari_sam.models.build import (
    MODEL_CONFIGS,
    EfficientSamConfig,
    build_sam,
    config_from_dict,
    config_from_state_dict,
)
from napari_sam.models.efficient_sam import EfficientSam
from reference_utils import build_random_efficient_sam, tiny_efficient_sam_config

REPO = Path(__file__).resolve().parents[2]


def _reference_dirs() -> list[Path]:
    """``../shared/references`` beside the repository root, and beside the main checkout
    when this is a git worktree."""
    dirs = [REPO.parent / "shared" / "references"]
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=REPO,
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
        dirs.append(Path(common).parent.parent / "shared" / "references")
    except (OSError, subprocess.SubprocessError):
        pass
    return dirs


def _reference_module():
    for d in _reference_dirs():
        if (d / "efficient_sam" / "efficient_sam.py").is_file():
            if str(d) not in sys.path:
                sys.path.insert(0, str(d))
            import efficient_sam.efficient_sam as ref

            return ref
    pytest.skip(
        "the EfficientSAM reference code is absent: expected ../shared/references/efficient_sam "
        "beside the repository root"
    )


TINY = tiny_efficient_sam_config()


def random_efficient_sam(config: EfficientSamConfig = TINY, seed: int = 0) -> EfficientSam:
    return build_random_efficient_sam(config, seed)


def make_reference(config: EfficientSamConfig) -> torch.nn.Module:
    """The reference EfficientSam with the hyper-parameters of ``config`` (eval mode)."""
    ref = _reference_module()
    from efficient_sam.efficient_sam_decoder import MaskDecoder, PromptEncoder
    from efficient_sam.efficient_sam_encoder import ImageEncoderViT
    from efficient_sam.two_way_transformer import TwoWayTransformer

    assert config.pretrain_img_size == 224  # fixed in the reference encoder
    dim, e, s = config.prompt_embed_dim, config.image_embedding_size, config.img_size
    encoder = ImageEncoderViT(
        img_size=s, patch_size=config.patch_size, in_chans=3, patch_embed_dim=config.embed_dim,
        normalization_type="layer_norm", depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio, neck_dims=[dim, dim], act_layer=torch.nn.GELU,
    )
    decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth, embedding_dim=dim, num_heads=config.decoder_num_heads,
            mlp_dim=config.decoder_mlp_dim, activation=torch.nn.GELU,
            normalize_before_activation=False,
        ),
        num_multimask_outputs=config.num_multimask_outputs, activation=torch.nn.GELU,
        normalization_type="layer_norm", normalize_before_activation=False,
        iou_head_depth=config.iou_head_depth - 1, iou_head_hidden_dim=config.iou_head_hidden_dim,
        upscaling_layer_dims=list(config.upscaling_dims),
    )
    model = ref.EfficientSam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(dim, (e, e), (s, s)),
        decoder_max_num_input_points=config.max_points,
        mask_decoder=decoder,
    )
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    ours = random_efficient_sam()
    ref = make_reference(TINY)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


RNG = np.random.default_rng(7)
YY, XX = np.mgrid[0:90, 0:150]
BLOB = np.exp(-((YY - 40) ** 2 + (XX - 70) ** 2) / 600.0)
IMAGES = {
    "rgb_uint8_90x150": RNG.integers(0, 256, (90, 150, 3), dtype=np.uint8),
    "gray_uint16_90x150": (BLOB * 40000 + RNG.integers(0, 3000, BLOB.shape)).astype(np.uint16),
    "float32_200x70": RNG.normal(-3.0, 2.0, (200, 70)).astype(np.float32),
}

# (name, points (row, col), labels, box (row0, col0, row1, col1))
PROMPTS = [
    ("one_point", [[30, 40]], [1], None),
    ("negative_points", [[30, 40], [10, 20], [60, 50]], [1, 0, 0], None),
    ("box", None, None, [10, 15, 60, 55]),
    ("box_and_points", [[30, 40], [12, 17]], [1, 0], [10, 15, 60, 55]),
]


def _reference_predict(ref, rgb, points, labels, box, multimask):
    """Reference low-res logits (C, 4E, 4E), full-size logits (C, H, W) and IoU (C,)."""
    h, w = rgb.shape[:2]
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    xy, lab = [], []
    if points is not None:
        xy += [[c, r] for r, c in points]
        lab += list(labels)
    if box is not None:
        r0, c0, r1, c1 = box
        xy += [[c0, r0], [c1, r1]]
        lab += [2, 3]
    pts = torch.tensor(xy, dtype=torch.float32)[None, None]
    lbl = torch.tensor(lab, dtype=torch.float32)[None, None]
    with torch.no_grad():
        emb = ref.get_image_embeddings(image)
        low, iou = ref.predict_masks(emb, pts, lbl, multimask, h, w)
        full, _ = ref.predict_masks(emb, pts, lbl, multimask, h, w, h, w)
    return emb, low[0, 0], full[0, 0], iou[0, 0]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> None:
    span = float(b.max() - b.min())
    assert span > 0
    err = float((a - b).abs().max())
    assert err <= rel * span, f"max error {err:.3g} > {rel} x range {span:.3g}"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# ------------------------------------------------------------------ model and engine vs reference


@pytest.mark.reference
@pytest.mark.parametrize("image_name", list(IMAGES))
def test_predictor_matches_reference(pair, image_name):
    ours, ref = pair
    image = IMAGES[image_name]
    rgb = to_rgb_uint8(image)
    predictor = Predictor(ours)
    predictor.set_image(image)
    h, w = rgb.shape[:2]
    assert predictor.input_size == (TINY.img_size, TINY.img_size)
    for name, points, labels, box in PROMPTS:
        for multimask in (True, False):
            ref_emb, ref_low, ref_full, ref_iou = _reference_predict(
                ref, rgb, points, labels, box, multimask
            )
            _close(predictor.features, ref_emb, 1e-4)
            pred = predictor.predict(
                points=None if points is None else np.array(points, dtype=float),
                labels=labels, box=None if box is None else np.array(box, dtype=float),
                multimask=multimask,
            )
            n_out = 3 if multimask else 1
            assert pred.masks.shape == (n_out, h, w) and pred.logits.shape == (n_out, 32, 32)
            _close(torch.from_numpy(pred.logits), ref_low)
            np.testing.assert_allclose(pred.scores, ref_iou.numpy(), atol=1e-3 * max(
                1.0, float(ref_iou.abs().max())))
            ref_masks = (ref_full > 0).numpy()
            for k in range(n_out):
                assert 0 < ref_masks[k].sum() < ref_masks[k].size, f"{name}: degenerate mask"
                assert _iou(pred.masks[k], ref_masks[k]) >= 0.999, (name, multimask, k)
            logits = predictor.predict(
                points=None if points is None else np.array(points, dtype=float),
                labels=labels, box=None if box is None else np.array(box, dtype=float),
                multimask=multimask, return_logits=True,
            ).masks
            _close(torch.from_numpy(logits), ref_full)


@pytest.mark.reference
def test_batched_prompts_match_single_ones(pair):
    ours, _ = pair
    predictor = Predictor(ours)
    predictor.set_image(IMAGES["rgb_uint8_90x150"])
    boxes = np.array([[10, 15, 60, 55], [5, 5, 80, 140]], dtype=float)
    batch = predictor.predict(box=boxes, multimask=False)
    for i, b in enumerate(boxes):
        one = predictor.predict(box=b, multimask=False)
        np.testing.assert_allclose(batch.logits[i], one.logits, atol=1e-4)
        np.testing.assert_array_equal(batch.masks[i], one.masks)


@pytest.mark.reference
def test_official_sizes_have_the_reference_keys_and_shapes():
    ref = _reference_module()
    for name, (width, heads) in {"efficientsam_ti": (192, 3), "efficientsam_s": (384, 6)}.items():
        with torch.device("meta"):
            ours = build_sam(name).state_dict()
            theirs = ref.build_efficient_sam(width, heads).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in theirs.items()
        }
        assert config_from_state_dict(theirs) == MODEL_CONFIGS[name]


# ------------------------------------------------------------------ checkpoints


def test_official_format_loads_by_path_with_weights_only(tmp_path):
    from napari_sam.models.checkpoint import model_from_checkpoint, save_model
    from napari_sam.models.zoo import load_model

    # the official files hold {"model": state_dict} of the 1024 px models; the tiny config
    # (not inferable: 128 px input) is checked through the official ViT-T layout below
    model = random_efficient_sam()
    path = tmp_path / "efficient_sam_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    torch.load(path, weights_only=True)  # the file is plain weights
    loaded = model_from_checkpoint(path, config=TINY)
    assert isinstance(loaded, EfficientSam)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # the official ViT-T layout is recognised by its keys alone (load_model(path))
    torch.manual_seed(0)
    vitt = build_sam("efficientsam_ti")
    path = tmp_path / "efficient_sam_vitt.pt"
    torch.save({"model": vitt.state_dict()}, path)
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, EfficientSam) and loaded.config == MODEL_CONFIGS["efficientsam_ti"]
    assert torch.equal(loaded.image_encoder.pos_embed, vitt.image_encoder.pos_embed)

    # our own .safetensors keeps the architecture in its metadata
    saved = save_model(model, tmp_path / "tiny.safetensors")
    again = load_model(saved, device="cpu")
    assert isinstance(again, EfficientSam) and again.config == TINY
    for cfg in (TINY, MODEL_CONFIGS["efficientsam_ti"], MODEL_CONFIGS["efficientsam_s"]):
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from napari_sam.errors import CheckpointError
    from napari_sam.models.zoo import load_model

    sd = random_efficient_sam().state_dict()
    del sd["mask_decoder.final_output_upscaling_layers.0.1.weight"]
    path = tmp_path / "broken.pt"
    torch.save({"model": sd, "napari_sam_config": TINY.to_dict()}, path)
    with pytest.raises(CheckpointError, match="final_output_upscaling_layers.0.1.weight"):
        load_model(path, device="cpu")


# ------------------------------------------------------------------ what EfficientSAM lacks


def test_mask_input_is_refused_and_sessions_refine_with_points():
    model = random_efficient_sam()
    predictor = Predictor(model)
    image = IMAGES["rgb_uint8_90x150"]
    predictor.set_image(image)
    first = predictor.predict(points=[[30, 40]])
    with pytest.raises(InvalidInputError, match="no mask_input"):
        predictor.predict(points=[[30, 40]], mask_input=first.logits[:1])

    session = InteractiveSession(predictor)
    session.update([[30, 40]], [1])
    request = session.request([[30, 40], [10, 20]], [1, 0])
    assert not request.refine and request.mask_input is None  # a correction click: points only
    pred = session.decode(request)
    want = predictor.predict(points=[[30, 40], [10, 20]], labels=[1, 0], multimask=False)
    np.testing.assert_array_equal(pred.masks, want.masks)


def test_limit_prompt_points_keeps_the_first_and_the_latest():
    keep, note = limit_prompt_points(5, False, 6)
    assert keep.tolist() == [0, 1, 2, 3, 4] and note is None
    keep, note = limit_prompt_points(8, False, 6)
    assert keep.tolist() == [0, 3, 4, 5, 6, 7]
    assert "at most 6" in note and "first and the latest 5" in note and "other 2" in note
    keep, note = limit_prompt_points(6, True, 6)
    assert keep.tolist() == [0, 3, 4, 5] and "box" in note
    assert limit_prompt_points(50, True, None)[1] is None


def test_more_than_six_points_warn_and_use_the_first_and_latest():
    model = random_efficient_sam()
    predictor = Predictor(model)
    predictor.set_image(IMAGES["rgb_uint8_90x150"])
    points = np.array([[10 + 8 * i, 12 + 15 * i] for i in range(8)], dtype=float)
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1])
    with pytest.warns(UserWarning, match="at most 6 prompt points"):
        got = predictor.predict(points=points, labels=labels, multimask=False)
    keep = [0, 3, 4, 5, 6, 7]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = predictor.predict(points=points[keep], labels=labels[keep], multimask=False)
    np.testing.assert_array_equal(got.masks, want.masks)

    session = InteractiveSession(predictor)
    request = session.request(points, labels)
    assert request.note is not None and "first and the latest 5" in request.note
    assert session.request(points[:6], labels[:6]).note is None
    # SAM models have no limit
    assert InteractiveSession(Predictor(build_sam_tiny())).request(points, labels).note is None


def build_sam_tiny():
    from reference_utils import build_random_sam, tiny_vit_sam_config

    return build_random_sam(tiny_vit_sam_config())


def test_sam_models_keep_their_convention():
    from napari_sam.engine.transforms import ImageTransform, StretchTransform

    sam = Predictor(build_sam_tiny())
    assert type(sam.transform) is ImageTransform and sam.decoder.kind == "factored"
    esam = Predictor(random_efficient_sam())
    assert type(esam.transform) is StretchTransform and esam.decoder.kind == "reference"
    with pytest.raises(InvalidInputError, match="no fast path"):
        Predictor(random_efficient_sam(), decoder="factored")


# ------------------------------------------------------------------ everything-mode and the CLI


def test_everything_mode_runs_with_efficient_sam():
    from napari_sam.engine.everything import AutomaticMaskGenerator

    image = IMAGES["gray_uint16_90x150"]
    model = random_efficient_sam()
    gen = AutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.0,
                                 stability_score_thresh=0.0)
    records = gen.generate(image)
    assert records, "random weights still give some masks"
    predictor = Predictor(model)
    predictor.set_image(image)
    for r in records:
        assert r["segmentation"].shape == image.shape and r["segmentation"].any()
        (x, y), = r["point_coords"]
        candidates = predictor.predict(points=[[y, x]]).masks  # (row, col)
        assert max(_iou(r["segmentation"], m) for m in candidates) >= 0.999


def test_cli_segment_and_everything_with_an_efficient_sam_file(tmp_path):
    from PIL import Image

    from napari_sam.engine.io import read_labels
    from napari_sam.models.checkpoint import save_model
    from napari_sam.models.zoo import load_model

    model_path = save_model(random_efficient_sam(), tmp_path / "esam.safetensors")
    img = np.full((64, 80, 3), 30, dtype=np.uint8)
    img[20:40, 25:50] = 200
    Image.fromarray(img).save(tmp_path / "img.png")
    (tmp_path / "p.json").write_text('[{"box": [18, 22, 42, 52]}, {"points": [[5, 5]]}]')
    env_cmd = [sys.executable, "-m", "napari_sam.cli"]
    out = tmp_path / "labels.png"
    res = subprocess.run(
        [*env_cmd, "segment", str(tmp_path / "img.png"), "--prompts", str(tmp_path / "p.json"),
         "--out", str(out), "--model", str(model_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    predictor = Predictor(load_model(model_path, device="cpu"))
    predictor.set_image(img)
    p = predictor.predict(box=[18, 22, 42, 52])
    want = p.masks[int(np.argmax(p.scores))]
    got = read_labels(out)
    assert np.array_equal(got == 1, want)

    out2 = tmp_path / "everything.png"
    res = subprocess.run(
        [*env_cmd, "everything", str(tmp_path / "img.png"), "--out", str(out2), "--model",
         str(model_path), "--device", "cpu", "--points-per-side", "4",
         "--pred-iou-thresh", "0", "--stability-score-thresh", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert read_labels(out2).max() > 0




def test_propagation_through_z_prompts_efficient_sam_without_logits():
    from napari_sam.engine.propagate import PropagationSettings, propagate_volume

    plane = IMAGES["rgb_uint8_90x150"][..., 0]
    volume = np.stack([plane, np.roll(plane, 2, axis=1), np.roll(plane, 4, axis=1)])
    settings = PropagationSettings(min_score=0.0, min_overlap=0.0, max_area_ratio=1e6,
                                   min_contrast=0.0, use_mask=True)
    result = propagate_volume(Predictor(random_efficient_sam()), volume, 1, box=[10, 15, 60, 55],
                              settings=settings)
    assert result.masks.shape == volume.shape and result.masks[1].any()


def test_embedding_store_keeps_efficient_sams_geometry(tmp_path):
    from napari_sam.engine.store import EmbeddingStore, embed_to_store

    model = random_efficient_sam()
    stack = np.stack([IMAGES["rgb_uint8_90x150"][..., c] for c in range(2)])
    writer = Predictor(model)
    embed_to_store(writer, stack, tmp_path / "s.sam.zarr", tile_size=None)
    store = EmbeddingStore.open(tmp_path / "s.sam.zarr")
    assert tuple(store.geometry[0, -2:]) == (TINY.img_size, TINY.img_size)  # stretched
    reader = Predictor(model, store=store)
    reader.set_image(stack[1])
    assert reader.store.hits == 1
    assert reader.input_size == (TINY.img_size, TINY.img_size)  # stretched, not resized
    fresh = Predictor(model)
    fresh.set_image(stack[1])
    np.testing.assert_array_equal(reader.predict(box=[10, 15, 60, 55]).masks,
                                  fresh.predict(box=[10, 15, 60, 55]).masks)
