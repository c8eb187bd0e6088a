"""Helpers for tests: small configs, seeded random models, reference-model builders.

``make_reference_sam(config)`` builds the official implementation
(``segment_anything.modeling``, or ``mobile_sam.modeling`` for TinyViT) with the
hyper-parameters of a :class:`~napari_sam.models.build.SamConfig`, so tests can
copy our weights into it with ``ref.load_state_dict(ours.state_dict())``.
Importing the reference packages needs ``tests/conftest.py`` (it provides the
torchvision/timm stand-ins).
"""

from __future__ import annotations

from functools import partial

import torch

from napari_sam.models.build import (
    EfficientSamConfig,
    SamConfig,
    TinyViTEncoderConfig,
    ViTEncoderConfig,
    build_sam,
)
from napari_sam.models.sam import PIXEL_MEAN, PIXEL_STD, Sam


def tiny_vit_sam_config(**overrides) -> SamConfig:
    """128 px input, 8 x 8 embedding, 2 blocks (windowed 4 x 4 + global), width 64."""
    enc = dict(
        img_size=128,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=4,
        mlp_ratio=4.0,
    )
    enc.update(overrides.pop("encoder", {}))
    kw = dict(
        prompt_embed_dim=64,
        decoder_depth=2,
        decoder_mlp_dim=128,
        decoder_num_heads=8,
        iou_head_depth=3,
        iou_head_hidden_dim=64,
        num_multimask_outputs=3,
        mask_in_chans=16,
    )
    kw.update(overrides)
    return SamConfig(encoder=ViTEncoderConfig(**enc), **kw)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every constant-initialised tensor (zeros/ones: biases, norms, position
    embeddings, relative position tables, attention biases, BN statistics) so that
    equivalence tests exercise them. Other weights keep their random init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif t.numel() == 1 or bool((t == t.flatten()[0]).all()):
                t.add_(scale * torch.randn(t.shape, generator=gen))
    return model


def build_random_sam(config: SamConfig | str, seed: int = 0) -> Sam:
    """Our Sam with seeded random weights (see :func:`randomize_`), in eval mode."""
    torch.manual_seed(seed)
    return randomize_(build_sam(config), seed=seed).eval()


def make_reference_sam(config: SamConfig) -> torch.nn.Module:
    """The official implementation with the same hyper-parameters (eval mode)."""
    enc = config.encoder
    dim = config.prompt_embed_dim
    e = config.image_embedding_size
    if isinstance(enc, TinyViTEncoderConfig):
        from mobile_sam import modeling as ref

        if dim != 256:
            raise ValueError("mobile_sam's TinyViT neck is fixed at 256 channels")
        encoder = ref.TinyViT(
            img_size=enc.img_size,
            in_chans=3,
            num_classes=enc.num_classes,
            embed_dims=list(enc.embed_dims),
            depths=list(enc.depths),
            num_heads=list(enc.num_heads),
            window_sizes=list(enc.window_sizes),
            mlp_ratio=enc.mlp_ratio,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=enc.mbconv_expand_ratio,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    else:
        from segment_anything import modeling as ref

        encoder = ref.ImageEncoderViT(
            img_size=enc.img_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=enc.window_size,
            global_attn_indexes=tuple(enc.global_attn_indexes),
        )
    sam = ref.Sam(
        image_encoder=encoder,
        prompt_encoder=ref.PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(e, e),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=ref.MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=ref.TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def reference_pair(config: SamConfig, seed: int = 0) -> tuple[Sam, torch.nn.Module]:
    """(ours, reference) with identical random weights, both in eval mode."""
    ours = build_random_sam(config, seed=seed)
    ref = make_reference_sam(config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref.eval()


def tiny_efficient_sam_config(**overrides) -> EfficientSamConfig:
    """EfficientSAM at 128 px: 8 x 8 embedding, 2 global blocks of width 64, 32 x 32 logits."""
    kw = dict(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2,
              prompt_embed_dim=64, decoder_mlp_dim=128, upscaling_dims=(16, 8),
              iou_head_hidden_dim=64)
    kw.update(overrides)
    return EfficientSamConfig(**kw)


def build_random_efficient_sam(config: EfficientSamConfig | None = None, seed: int = 0):
    """Our EfficientSam with seeded random weights (see :func:`randomize_`), in eval mode."""
    torch.manual_seed(seed)
    return randomize_(build_sam(config or tiny_efficient_sam_config()), seed=seed).eval()
