"""Fast tests of our model components (small random-weight models only)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from napari_sam.errors import CheckpointError, InvalidInputError
from napari_sam.models import image_encoder as ie
from napari_sam.models.build import (
    MODEL_CONFIGS,
    SamConfig,
    TinyViTEncoderConfig,
    ViTEncoderConfig,
    build_sam,
    config_from_state_dict,
)
from reference_utils import build_random_sam, tiny_vit_sam_config


def _points(b: int = 2, n: int = 3, size: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(b, n, 2, generator=g) * size
    labels = torch.randint(0, 2, (b, n), generator=g)
    return coords, labels


@torch.no_grad()
def test_shapes_end_to_end(tiny_sam):
    e = tiny_sam.config.image_embedding_size
    assert (tiny_sam.img_size, e) == (128, 8)
    emb = tiny_sam.image_encoder(torch.randn(1, 3, 128, 128))
    assert emb.shape == (1, 64, e, e)
    pe = tiny_sam.prompt_encoder.get_dense_pe()
    assert pe.shape == (1, 64, e, e)

    coords, labels = _points(b=2, n=3)
    sparse, dense = tiny_sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape == (2, 4, 64)  # 3 points + 1 padding token (no box)
    assert dense.shape == (2, 64, e, e)
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 127.0, 127.0]])
    sparse_b, _ = tiny_sam.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
    assert sparse_b.shape == (2, 5, 64)  # 3 points + 2 box corners
    sparse_box, _ = tiny_sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    assert sparse_box.shape == (2, 2, 64)
    mask_in = torch.randn(2, 1, 4 * e, 4 * e)
    _, dense_m = tiny_sam.prompt_encoder(points=None, boxes=None, masks=mask_in)
    assert dense_m.shape == (2, 64, e, e)
    empty, dense0 = tiny_sam.prompt_encoder(points=None, boxes=None, masks=None)
    assert empty.shape == (1, 0, 64) and dense0.shape == (1, 64, e, e)

    for multi, c in ((True, 3), (False, 1)):
        masks, iou = tiny_sam.mask_decoder(emb, pe, sparse, dense, multimask_output=multi)
        assert masks.shape == (2, c, 4 * e, 4 * e)
        assert iou.shape == (2, c)
        assert torch.isfinite(masks).all()


@torch.no_grad()
def test_multimask_and_single_mask_are_token_slices(tiny_sam):
    emb = tiny_sam.image_encoder(torch.randn(1, 3, 128, 128))
    pe = tiny_sam.prompt_encoder.get_dense_pe()
    sparse, dense = tiny_sam.prompt_encoder(points=_points(), boxes=None, masks=None)
    all_masks, all_iou = tiny_sam.mask_decoder.predict_masks(emb, pe, sparse, dense)
    multi, multi_iou = tiny_sam.mask_decoder(emb, pe, sparse, dense, True)
    single, single_iou = tiny_sam.mask_decoder(emb, pe, sparse, dense, False)
    torch.testing.assert_close(multi, all_masks[:, 1:])
    torch.testing.assert_close(single, all_masks[:, :1])
    torch.testing.assert_close(multi_iou, all_iou[:, 1:])
    torch.testing.assert_close(single_iou, all_iou[:, :1])
    assert not torch.allclose(single, multi[:, :1])


@torch.no_grad()
def test_decoder_pairs_batched_embeddings_with_prompts(tiny_sam):
    emb = tiny_sam.image_encoder(torch.randn(2, 3, 128, 128))
    pe = tiny_sam.prompt_encoder.get_dense_pe()
    sparse, dense = tiny_sam.prompt_encoder(points=_points(b=2), boxes=None, masks=None)
    both, _ = tiny_sam.mask_decoder(emb, pe, sparse, dense, True)
    for i in range(2):
        one, _ = tiny_sam.mask_decoder(
            emb[i : i + 1], pe, sparse[i : i + 1], dense[i : i + 1], True
        )
        torch.testing.assert_close(both[i : i + 1], one, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInputError, match="batch"):
        tiny_sam.mask_decoder(emb, pe, sparse[:1].expand(3, -1, -1), dense[:1], True)


@torch.no_grad()
def test_point_labels(tiny_sam):
    pe = tiny_sam.prompt_encoder
    coords = torch.tensor([[[10.0, 20.0], [50.0, 40.0]]])
    fg, _ = pe(points=(coords, torch.tensor([[1, 1]])), boxes=None, masks=None)
    bg, _ = pe(points=(coords, torch.tensor([[0, 0]])), boxes=None, masks=None)
    assert not torch.allclose(fg[:, :2], bg[:, :2])
    # a padding point ignores its coordinates
    pad_a, _ = pe(points=(coords, torch.tensor([[1, -1]])), boxes=None, masks=None)
    pad_b, _ = pe(points=(coords * 0.5, torch.tensor([[1, -1]])), boxes=None, masks=None)
    torch.testing.assert_close(pad_a[:, 1], pad_b[:, 1])
    torch.testing.assert_close(pad_a[:, 1], pe.not_a_point_embed.weight)
    # labels 2/3 are box corners: same tokens as the box prompt
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    corners, _ = pe(points=(box.view(1, 2, 2), torch.tensor([[2, 3]])), boxes=None, masks=None)
    box_tokens, _ = pe(points=None, boxes=box, masks=None)
    torch.testing.assert_close(corners[:, :2], box_tokens)
    with pytest.raises(InvalidInputError, match="labels"):
        pe(points=(coords, torch.tensor([[1, 7]])), boxes=None, masks=None)


def test_preprocess_and_postprocess(tiny_sam):
    x = torch.full((1, 3, 100, 60), 255.0)
    y = tiny_sam.preprocess(x)
    assert y.shape == (1, 3, 128, 128)
    expected = (255.0 - tiny_sam.pixel_mean) / tiny_sam.pixel_std
    torch.testing.assert_close(y[0, :, :100, :60], expected.expand(3, 100, 60))
    assert (y[0, :, 100:] == 0).all() and (y[0, :, :, 60:] == 0).all()

    low = torch.zeros(1, 1, 32, 32)
    low[..., :16, :] = 5.0  # top half of the padded frame is positive
    out = tiny_sam.postprocess_masks(low, input_size=(64, 128), original_size=(30, 60))
    assert out.shape == (1, 1, 30, 60)
    # the kept 64 rows of the 128 frame are the top half: entirely positive
    assert (out > 0).all()


def test_window_partition_roundtrip():
    x = torch.randn(2, 10, 7, 5)
    windows, padded = ie.window_partition(x, 4)
    assert padded == (12, 8) and windows.shape == (2 * 3 * 2, 4, 4, 5)
    torch.testing.assert_close(windows[0], x[0, :4, :4])
    assert (windows[-1][2:] == 0).all()  # bottom rows of the last window are padding
    torch.testing.assert_close(ie.window_unpartition(windows, 4, padded, (10, 7)), x)


def test_relative_position_table():
    table = torch.arange(7.0)[:, None].expand(7, 2)
    t = ie.relative_position_table(table, 4)
    assert t.shape == (4, 4, 2)
    assert t[0, 0, 0] == 3 and t[3, 0, 0] == 6 and t[0, 3, 0] == 0
    assert ie.relative_position_table(table, 6).shape == (6, 6, 2)  # resampled


@torch.no_grad()
def test_chunked_global_attention_matches_single_pass(monkeypatch):
    torch.manual_seed(0)
    attn = ie.Attention(dim=32, num_heads=2, rel_pos_size=6).eval()
    for p in attn.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 6, 6, 32)
    full = attn(x)
    monkeypatch.setattr(ie, "ATTN_BIAS_BUDGET_BYTES", 1)  # one query row per chunk
    chunked = attn(x)
    torch.testing.assert_close(full, chunked, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_windowed_attention_pads_tokens_with_zeros():
    """Padding after the qkv projection (our shortcut) == zero-padding the tokens."""
    torch.manual_seed(0)
    attn = ie.Attention(dim=32, num_heads=2, rel_pos_size=4).eval()
    for p in attn.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 6, 7, 32)
    windows, padded = ie.window_partition(x, 4)  # zero tokens at the bottom/right
    expected = ie.window_unpartition(attn(windows), 4, padded, (6, 7))
    torch.testing.assert_close(attn(x, window_size=4), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tiny_vit_runs_at_non_default_size():
    cfg = SamConfig(
        TinyViTEncoderConfig(
            img_size=256,
            embed_dims=(16, 32, 48, 64),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 3, 4),
            window_sizes=(7, 7, 7, 7),
        ),
        prompt_embed_dim=64,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    )
    sam = build_random_sam(cfg)
    out = sam.image_encoder(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 64, 16, 16)
    assert sam.prompt_encoder.get_dense_pe().shape == (1, 64, 16, 16)


@torch.no_grad()
def test_sam_forward_records(tiny_sam):
    img = torch.randint(0, 256, (3, 128, 96)).float()
    records = [
        {
            "image": img,
            "original_size": (64, 48),
            "point_coords": torch.tensor([[[30.0, 40.0]]]),
            "point_labels": torch.tensor([[1]]),
        },
        {"image": img, "original_size": (64, 48), "boxes": torch.tensor([[5.0, 5.0, 90.0, 120.0]])},
    ]
    out = tiny_sam(records, multimask_output=True)
    assert out[0]["masks"].shape == (1, 3, 64, 48) and out[0]["masks"].dtype == torch.bool
    assert out[1]["iou_predictions"].shape == (1, 3)
    assert out[1]["low_res_logits"].shape == (1, 3, 32, 32)


def test_config_roundtrip_and_validation(tiny_sam_config):
    # EfficientSAM configs have their own round trip (tests/models/test_efficient_sam.py)
    sam_configs = [c for c in MODEL_CONFIGS.values() if isinstance(c, SamConfig)]
    for cfg in [tiny_sam_config, *sam_configs]:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["encoder_type"] in ("vit", "tiny_vit")
        assert SamConfig.from_dict(d) == cfg
    assert MODEL_CONFIGS["vit_t"].encoder_type == "tiny_vit"
    with pytest.raises(InvalidInputError, match="unknown"):
        SamConfig.from_dict({**tiny_sam_config.to_dict(), "bogus": 1})
    with pytest.raises(InvalidInputError, match="encoder_type"):
        SamConfig.from_dict({**tiny_sam_config.to_dict(), "encoder_type": "resnet"})
    with pytest.raises(InvalidInputError):
        ViTEncoderConfig(img_size=100, patch_size=16)
    with pytest.raises(InvalidInputError):
        ViTEncoderConfig(depth=2, global_attn_indexes=(5,))
    with pytest.raises(InvalidInputError):
        replace(tiny_sam_config, decoder_num_heads=7)
    with pytest.raises(InvalidInputError, match="vit_b"):
        build_sam("vit_x")


def test_official_configs_match_published_hyperparameters():
    b, l, h = (MODEL_CONFIGS[k].encoder for k in ("vit_b", "vit_l", "vit_h"))
    assert (b.embed_dim, b.depth, b.num_heads, b.global_attn_indexes) == (
        768,
        12,
        12,
        (2, 5, 8, 11),
    )
    assert (l.embed_dim, l.depth, l.num_heads, l.global_attn_indexes) == (
        1024,
        24,
        16,
        (5, 11, 17, 23),
    )
    assert (h.embed_dim, h.depth, h.num_heads, h.global_attn_indexes) == (
        1280,
        32,
        16,
        (7, 15, 23, 31),
    )
    for cfg in MODEL_CONFIGS.values():
        assert cfg.img_size == 1024 and cfg.image_embedding_size == 64
        assert cfg.prompt_embed_dim == 256


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "vit_t"])
def test_config_inferred_from_official_shapes(name):
    with torch.device("meta"):
        sd = build_sam(name).state_dict()
    assert config_from_state_dict(sd) == MODEL_CONFIGS[name]


def test_config_inferred_from_custom_shapes(tiny_sam, tiny_sam_config):
    assert config_from_state_dict(tiny_sam.state_dict()) == tiny_sam_config
    custom = tiny_vit_sam_config(
        encoder=dict(
            img_size=160,
            embed_dim=96,
            depth=4,
            num_heads=3,
            window_size=5,
            global_attn_indexes=(1, 3),
            mlp_ratio=2.0,
        ),
        decoder_depth=1,
        iou_head_depth=2,
    )
    with torch.device("meta"):
        sd = build_sam(custom).state_dict()
    assert config_from_state_dict(sd) == custom
    all_global = tiny_vit_sam_config(encoder=dict(window_size=0, global_attn_indexes=()))
    with torch.device("meta"):
        sd = build_sam(all_global).state_dict()
    inferred = config_from_state_dict(sd).encoder
    assert inferred.window_size == 0 and inferred.global_attn_indexes == (0, 1)
    with pytest.raises(CheckpointError, match="SAM"):
        config_from_state_dict({"foo.weight": torch.zeros(2)})
