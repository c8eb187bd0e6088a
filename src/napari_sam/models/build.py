"""Model configurations, builders and configuration inference from state dicts.

``SamConfig`` fully describes a SAM architecture and ``EfficientSamConfig`` an
EfficientSAM one (both JSON-able through ``to_dict``/``from_dict``, read back
with :func:`config_from_dict`); ``build_sam`` turns a config (or the name of an
official one in ``MODEL_CONFIGS``) into a randomly initialised :class:`Sam` or
:class:`~.efficient_sam.EfficientSam` (the builder of each config type is in
``MODEL_BUILDERS``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CheckpointError, InvalidInputError
from .ais_head import AisHead
from .ais_refiner import AisRefiner
from .efficient_sam import EfficientSam
from .efficient_sam_decoder import EfficientMaskDecoder
from .efficient_sam_encoder import EfficientViTEncoder
from .efficient_sam_prompt_encoder import MAX_PROMPT_POINTS, EfficientPromptEncoder
from .efficient_sam_transformer import EfficientTwoWayTransformer
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .mask_refiner import MaskRefiner
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidInputError(msg)


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a sequence of integers, got {value!r}") from exc


@dataclass(frozen=True)
class ViTEncoderConfig:
    """SAM ViT image encoder (``window_size=0`` makes every block global)."""

    encoder_type: ClassVar[str] = "vit"

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "global_attn_indexes", _int_tuple(self.global_attn_indexes, "global_attn_indexes")
        )
        _check(self.patch_size > 0 and self.img_size > 0, "img_size and patch_size must be > 0")
        _check(
            self.img_size % self.patch_size == 0,
            f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})",
        )
        _check(self.depth > 0 and self.num_heads > 0, "depth and num_heads must be > 0")
        _check(
            self.embed_dim % self.num_heads == 0,
            f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})",
        )
        _check(self.window_size >= 0, "window_size must be >= 0")
        _check(
            all(0 <= i < self.depth for i in self.global_attn_indexes),
            f"global_attn_indexes {self.global_attn_indexes} must lie in [0, {self.depth})",
        )

    @property
    def embedding_size(self) -> int:
        """Side E of the (E, E) image embedding grid."""
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class TinyViTEncoderConfig:
    """MobileSAM TinyViT image encoder (four stages, output stride 16)."""

    encoder_type: ClassVar[str] = "tiny_vit"

    img_size: int = 1024
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    num_classes: int = 1000  # unused classification head, kept for checkpoint compatibility

    def __post_init__(self) -> None:
        for name in ("embed_dims", "depths", "num_heads", "window_sizes"):
            object.__setattr__(self, name, _int_tuple(getattr(self, name), name))
        _check(
            len(self.embed_dims)
            == len(self.depths)
            == len(self.num_heads)
            == len(self.window_sizes)
            == 4,
            "TinyViT needs exactly 4 stages (embed_dims, depths, num_heads, window_sizes)",
        )
        _check(self.img_size > 0 and self.img_size % 16 == 0, "img_size must be a multiple of 16")
        for i in range(1, 4):
            _check(
                self.embed_dims[i] % self.num_heads[i] == 0,
                f"embed_dims[{i}] must be divisible by num_heads[{i}]",
            )

    @property
    def patch_size(self) -> int:
        """Total stride of the encoder."""
        return 16

    @property
    def embedding_size(self) -> int:
        return self.img_size // 16


EncoderConfig = ViTEncoderConfig | TinyViTEncoderConfig
_ENCODER_CONFIGS: dict[str, type] = {"vit": ViTEncoderConfig, "tiny_vit": TinyViTEncoderConfig}


@dataclass(frozen=True)
class SamConfig:
    """Complete SAM architecture description."""

    encoder: ViTEncoderConfig | TinyViTEncoderConfig = field(default_factory=ViTEncoderConfig)
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    mask_in_chans: int = 16
    # width of the AIS head (models/ais_head.py); 0: the model has none (official SAM)
    ais_head_hidden: int = 0
    # channels per level of the mask refiner (models/mask_refiner.py); (): none
    refiner_widths: tuple[int, ...] = ()
    # channels per level of the AIS map refiner (models/ais_refiner.py); (): none
    ais_refiner_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check(
            isinstance(self.encoder, ViTEncoderConfig | TinyViTEncoderConfig),
            f"encoder must be a ViTEncoderConfig or TinyViTEncoderConfig, got {self.encoder!r}",
        )
        _check(self.prompt_embed_dim % 8 == 0, "prompt_embed_dim must be a multiple of 8")
        _check(
            (self.prompt_embed_dim // 2) % self.decoder_num_heads == 0,
            f"decoder_num_heads ({self.decoder_num_heads}) must divide prompt_embed_dim / 2",
        )
        _check(self.mask_in_chans % 4 == 0, "mask_in_chans must be a multiple of 4")
        _check(self.iou_head_depth >= 1 and self.decoder_depth >= 1, "depths must be >= 1")
        _check(
            self.ais_head_hidden == 0
            or (self.ais_head_hidden >= 2 and self.ais_head_hidden % 2 == 0),
            f"ais_head_hidden must be 0 (no head) or an even number >= 2, got "
            f"{self.ais_head_hidden}",
        )
        for name in ("refiner_widths", "ais_refiner_widths"):
            widths = getattr(self, name)
            _check(
                isinstance(widths, tuple)
                and all(isinstance(w, int) and w >= 1 for w in widths)
                and len(widths) != 1,
                f"{name} must be () (no refiner) or >= 2 positive ints, got {widths!r}",
            )

    @property
    def encoder_type(self) -> str:
        return self.encoder.encoder_type

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def image_embedding_size(self) -> int:
        """Side E of the image embedding; low-res masks are 4E x 4E."""
        return self.encoder.embedding_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d: dict[str, Any] = {"encoder_type": self.encoder_type}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "encoder":
                value = {
                    k: list(v) if isinstance(v, tuple) else v for k, v in asdict(value).items()
                }
            d[f.name] = value
        if not self.ais_head_hidden:
            del d["ais_head_hidden"]  # head-less configs keep their old form
        for name in ("refiner_widths", "ais_refiner_widths"):  # refiner-less configs: old form
            if d[name]:
                d[name] = list(d[name])
            else:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamConfig:
        """Inverse of :meth:`to_dict`; raises InvalidInputError on malformed data."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"a SAM config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        enc_type = data.pop("encoder_type", "vit")
        if enc_type not in _ENCODER_CONFIGS:
            raise InvalidInputError(
                f"unknown encoder_type {enc_type!r}; expected one of {sorted(_ENCODER_CONFIGS)}"
            )
        enc_cls = _ENCODER_CONFIGS[enc_type]
        enc_data = data.pop("encoder", {})
        known = {f.name for f in fields(cls)} - {"encoder"}
        unknown = set(data) - known
        enc_unknown = set(enc_data) - {f.name for f in fields(enc_cls)}
        if unknown or enc_unknown:
            raise InvalidInputError(f"unknown SAM config fields: {sorted(unknown | enc_unknown)}")
        for name in ("refiner_widths", "ais_refiner_widths"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        try:
            return cls(encoder=enc_cls(**enc_data), **data)
        except TypeError as exc:
            raise InvalidInputError(f"invalid SAM config: {exc}") from exc


@dataclass(frozen=True)
class EfficientSamConfig:
    """Complete EfficientSAM architecture description (ViT-T: width 192, 3 heads; ViT-S:
    384, 6 heads). The embedding is ``prompt_embed_dim`` x E x E, E = img_size / patch."""

    family: ClassVar[str] = "efficientsam"

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pretrain_img_size: int = 224
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    upscaling_dims: tuple[int, ...] = (64, 32)
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    max_points: int = MAX_PROMPT_POINTS

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "upscaling_dims", _int_tuple(self.upscaling_dims, "upscaling_dims")
        )
        _check(self.patch_size > 0 and self.img_size > 0, "img_size and patch_size must be > 0")
        _check(
            self.img_size % self.patch_size == 0
            and self.pretrain_img_size % self.patch_size == 0,
            f"img_size ({self.img_size}) and pretrain_img_size ({self.pretrain_img_size}) must "
            f"be multiples of patch_size ({self.patch_size})",
        )
        _check(self.depth > 0 and self.num_heads > 0, "depth and num_heads must be > 0")
        _check(
            self.embed_dim % self.num_heads == 0,
            f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})",
        )
        _check(self.prompt_embed_dim % 2 == 0, "prompt_embed_dim must be even")
        _check(
            (self.prompt_embed_dim // 2) % self.decoder_num_heads == 0,
            f"decoder_num_heads ({self.decoder_num_heads}) must divide prompt_embed_dim / 2",
        )
        _check(len(self.upscaling_dims) >= 1, "upscaling_dims needs at least one stage")
        _check(self.iou_head_depth >= 2 and self.decoder_depth >= 1,
               "iou_head_depth must be >= 2 and decoder_depth >= 1")
        _check(self.max_points >= 2, "max_points must be >= 2 (a box takes 2)")

    @property
    def image_embedding_size(self) -> int:
        """Side E of the image embedding; low-res masks are (2 ** stages) E square."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists), tagged with ``family``."""
        d: dict[str, Any] = {"family": self.family}
        for f in fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EfficientSamConfig:
        """Inverse of :meth:`to_dict`; raises InvalidInputError on malformed data."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(
                f"an EfficientSAM config must be a mapping, got {type(data).__name__}"
            )
        data = {k: v for k, v in data.items() if k != "family"}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown EfficientSAM config fields: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidInputError(f"invalid EfficientSAM config: {exc}") from exc


ModelConfig = SamConfig | EfficientSamConfig


def config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """A :class:`SamConfig` or :class:`EfficientSamConfig` from its ``to_dict()`` form
    (``"family": "efficientsam"`` marks the latter)."""
    if isinstance(data, Mapping) and data.get("family") == EfficientSamConfig.family:
        return EfficientSamConfig.from_dict(data)
    return SamConfig.from_dict(data)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "vit_b": SamConfig(ViTEncoderConfig()),
    "vit_l": SamConfig(
        ViTEncoderConfig(
            embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)
        )
    ),
    "vit_h": SamConfig(
        ViTEncoderConfig(
            embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)
        )
    ),
    "vit_t": SamConfig(TinyViTEncoderConfig()),
    "efficientsam_ti": EfficientSamConfig(embed_dim=192, num_heads=3),
    "efficientsam_s": EfficientSamConfig(embed_dim=384, num_heads=6),
}


def _build_vit(cfg: ViTEncoderConfig, out_chans: int) -> nn.Module:
    return ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=out_chans,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )


def _build_tiny_vit(cfg: TinyViTEncoderConfig, out_chans: int) -> nn.Module:
    return TinyViT(
        img_size=cfg.img_size,
        embed_dims=cfg.embed_dims,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_sizes=cfg.window_sizes,
        mlp_ratio=cfg.mlp_ratio,
        mbconv_expand_ratio=cfg.mbconv_expand_ratio,
        out_chans=out_chans,
        num_classes=cfg.num_classes,
    )


# encoder_type -> builder(encoder config, out_chans) -> image encoder module
ENCODER_BUILDERS: dict[str, Callable[[Any, int], nn.Module]] = {
    "vit": _build_vit,
    "tiny_vit": _build_tiny_vit,
}


def build_sam(config: str | ModelConfig) -> Sam | EfficientSam:
    """Build a randomly initialised model from a config or an ``MODEL_CONFIGS`` name
    (a :class:`Sam` for a SamConfig, an EfficientSam for an EfficientSamConfig)."""
    if isinstance(config, str):
        if config not in MODEL_CONFIGS:
            raise InvalidInputError(
                f"unknown model config {config!r}; expected one of {sorted(MODEL_CONFIGS)}"
            )
        config = MODEL_CONFIGS[config]
    builder = MODEL_BUILDERS.get(type(config))
    if builder is None:
        raise InvalidInputError(
            f"config must be a str, SamConfig or EfficientSamConfig, got {type(config).__name__}"
        )
    return builder(config)


def _decoder_arguments(config: ModelConfig, transformer: type[nn.Module]) -> dict[str, Any]:
    """The keyword arguments SAM's and EfficientSAM's mask decoders share, with a
    ``transformer`` of that class built from ``config``."""
    return dict(
        transformer_dim=config.prompt_embed_dim,
        transformer=transformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            num_heads=config.decoder_num_heads,
            mlp_dim=config.decoder_mlp_dim,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )


def _build_segment_anything(config: SamConfig) -> Sam:
    """SAM / MobileSAM from its config."""
    dim = config.prompt_embed_dim
    e = config.image_embedding_size
    s = config.img_size
    encoder = ENCODER_BUILDERS[config.encoder_type](config.encoder, dim)
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(e, e),
        input_image_size=(s, s),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(**_decoder_arguments(config, TwoWayTransformer))
    ais_head = AisHead(dim, config.ais_head_hidden) if config.ais_head_hidden else None
    refiner = MaskRefiner(config.refiner_widths) if config.refiner_widths else None
    ais_refiner = AisRefiner(config.ais_refiner_widths) if config.ais_refiner_widths else None
    return Sam(encoder, prompt_encoder, mask_decoder, config=config, ais_head=ais_head,
               mask_refiner=refiner, ais_refiner=ais_refiner)


def build_efficient_sam(config: EfficientSamConfig) -> EfficientSam:
    """EfficientSAM (ViT-T / ViT-S) from its config, randomly initialised."""
    dim = config.prompt_embed_dim
    e = config.image_embedding_size
    s = config.img_size
    encoder = EfficientViTEncoder(
        img_size=s,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        neck_dim=dim,
        pretrain_img_size=config.pretrain_img_size,
    )
    prompt_encoder = EfficientPromptEncoder(dim, (e, e), (s, s), max_points=config.max_points)
    mask_decoder = EfficientMaskDecoder(
        **_decoder_arguments(config, EfficientTwoWayTransformer),
        upscaling_dims=config.upscaling_dims,
    )
    return EfficientSam(encoder, prompt_encoder, mask_decoder, config=config)


#: config type -> builder(config) -> randomly initialised model
MODEL_BUILDERS: dict[type, Callable[[Any], nn.Module]] = {
    SamConfig: _build_segment_anything,
    EfficientSamConfig: build_efficient_sam,
}


# ----------------------------------------------------------------------------------------
# configuration inference


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.fullmatch(k))}
    return max(found) + 1 if found else 0


def _shape(sd: Mapping[str, Any], key: str, ndim: int | None = None) -> tuple[int, ...]:
    """Shape of tensor ``key``; CheckpointError if it is missing or has not ``ndim`` axes."""
    if key not in sd:
        raise CheckpointError(
            f"cannot infer the model configuration: key {key!r} is missing; this does not "
            "look like a SAM / MobileSAM checkpoint"
        )
    shape = tuple(sd[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise CheckpointError(
            f"cannot infer the model configuration: tensor {key!r} has shape {shape}, "
            f"expected {ndim} axes; the file is damaged or not a SAM / MobileSAM checkpoint"
        )
    return shape


def _infer_vit(sd: Mapping[str, Any]) -> ViTEncoderConfig:
    p = "image_encoder."
    _, g, g2, dim = _shape(sd, p + "pos_embed", 4)
    patch = _shape(sd, p + "patch_embed.proj.weight", 4)[-1]
    depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.norm1\.weight")
    head_dim = _shape(sd, p + "blocks.0.attn.rel_pos_h", 2)[1]
    mlp_dim = _shape(sd, p + "blocks.0.mlp.lin1.weight", 2)[0]
    lengths = [_shape(sd, f"{p}blocks.{i}.attn.rel_pos_h", 2)[0] for i in range(depth)]
    global_idx = tuple(i for i, n in enumerate(lengths) if n == 2 * g - 1)
    # all windowed blocks share one window size; take the commonest length, so that a
    # mis-shaped tensor is reported by name (with both shapes) when the weights are checked
    windowed = Counter(n for n in lengths if n != 2 * g - 1)
    window = (windowed.most_common(1)[0][0] + 1) // 2 if windowed else 0
    return ViTEncoderConfig(
        img_size=g * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=dim // head_dim,
        global_attn_indexes=global_idx,
        window_size=window,
        mlp_ratio=mlp_dim / dim,
    )


def _infer_tiny_vit(sd: Mapping[str, Any]) -> TinyViTEncoderConfig:
    p = "image_encoder."
    dims = [_shape(sd, p + "patch_embed.seq.2.c.weight", 4)[0]]
    for i in range(3):
        dims.append(_shape(sd, f"{p}layers.{i}.downsample.conv1.c.weight", 4)[0])
    depths = [_count(sd, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\..*") for i in range(4)]
    heads, windows = [1], [1]
    for i in range(1, 4):
        nh, n_off = _shape(sd, f"{p}layers.{i}.blocks.0.attn.attention_biases", 2)
        heads.append(nh)
        windows.append(round(n_off**0.5))
    heads[0], windows[0] = 1, 7  # stage 0 is convolutional; placeholders
    hidden = _shape(sd, p + "layers.0.blocks.0.conv1.c.weight")[0]
    mlp_dim = _shape(sd, p + "layers.1.blocks.0.mlp.fc1.weight")[0]
    head_key = p + "head.weight"
    num_classes = _shape(sd, head_key)[0] if head_key in sd else 0
    default = TinyViTEncoderConfig()
    return TinyViTEncoderConfig(
        img_size=default.img_size,
        embed_dims=tuple(dims),
        depths=tuple(depths),
        num_heads=(default.num_heads[0], *heads[1:]),
        window_sizes=(default.window_sizes[0], *windows[1:]),
        mlp_ratio=mlp_dim / dims[1],
        mbconv_expand_ratio=hidden / dims[0],
        num_classes=num_classes,
    )


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Infer a :class:`SamConfig` (or :class:`EfficientSamConfig`) from parameter names and
    shapes.

    Everything is recovered from shapes except what weights cannot show: the
    mask decoder's number of attention heads (assumed 8, or the largest divisor
    of the attention width below 8) and TinyViT's input size (assumed 1024, the
    TinyViT weights do not depend on it). An EfficientSAM state dict (recognised by
    its box-corner embedding ``prompt_encoder.bbox_top_left_embeddings.weight``)
    further assumes the official input size 1024, 64-channel encoder heads
    (ViT-T: 3, ViT-S: 6) and 6 prompt points. Raises CheckpointError if the state dict
    is not a SAM one or its shapes make no valid architecture.
    """
    try:
        return _infer_config(state_dict)
    except InvalidInputError as exc:
        raise CheckpointError(f"inferred an invalid model configuration: {exc}") from None
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(
            f"cannot infer the model configuration: unexpected tensor shapes ({exc}); the file "
            "is damaged or not a SAM / MobileSAM checkpoint"
        ) from None


#: key that only EfficientSAM state dicts have
EFFICIENT_SAM_KEY = "prompt_encoder.bbox_top_left_embeddings.weight"
#: encoder head width of the official EfficientSAM models (not recoverable from shapes)
_EFFICIENT_SAM_HEAD_DIM = 64


def _infer_efficient_sam(sd: Mapping[str, Any]) -> EfficientSamConfig:
    p, d = "image_encoder.", "mask_decoder."
    _, n_pos, dim = _shape(sd, p + "pos_embed", 3)
    patch = _shape(sd, p + "patch_embed.proj.weight", 4)[-1]
    grid = round((n_pos - 1) ** 0.5)
    width = _shape(sd, EFFICIENT_SAM_KEY, 2)[1]
    n_up = _count(sd, r"mask_decoder\.final_output_upscaling_layers\.(\d+)\.0\.weight")
    return EfficientSamConfig(
        patch_size=patch,
        embed_dim=dim,
        depth=_count(sd, r"image_encoder\.blocks\.(\d+)\.norm1\.weight"),
        num_heads=max(1, dim // _EFFICIENT_SAM_HEAD_DIM) if dim % _EFFICIENT_SAM_HEAD_DIM == 0
        else next(h for h in range(8, 0, -1) if dim % h == 0),
        mlp_ratio=_shape(sd, p + "blocks.0.mlp.fc1.weight", 2)[0] / dim,
        pretrain_img_size=grid * patch,
        prompt_embed_dim=width,
        decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
        decoder_mlp_dim=_shape(sd, d + "transformer.layers.0.mlp.layers.0.0.weight", 2)[0],
        decoder_num_heads=next(h for h in range(8, 0, -1) if (width // 2) % h == 0),
        upscaling_dims=tuple(
            _shape(sd, f"{d}final_output_upscaling_layers.{i}.0.weight", 4)[1]
            for i in range(n_up)
        ),
        iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.0\.weight")
        + 1,
        iou_head_hidden_dim=_shape(sd, d + "iou_prediction_head.layers.0.0.weight", 2)[0],
        num_multimask_outputs=_shape(sd, d + "mask_tokens.weight", 2)[0] - 1,
    )


def _infer_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    if EFFICIENT_SAM_KEY in state_dict:
        return _infer_efficient_sam(state_dict)
    if "image_encoder.pos_embed" in state_dict:
        encoder: EncoderConfig = _infer_vit(state_dict)
    elif "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        encoder = _infer_tiny_vit(state_dict)
    else:
        raise CheckpointError(
            "cannot infer the model configuration: no 'image_encoder.pos_embed' (SAM ViT) or "
            "'image_encoder.patch_embed.seq.0.c.weight' (MobileSAM TinyViT) key; this does "
            "not look like a SAM checkpoint"
        )
    d = "mask_decoder."
    dim = _shape(state_dict, "prompt_encoder.no_mask_embed.weight", 2)[1]
    width = dim // 2
    heads = next(h for h in range(8, 0, -1) if width % h == 0)
    d_layers = r"mask_decoder\.transformer\.layers\."
    d_iou = r"mask_decoder\.iou_prediction_head\.layers\."
    return SamConfig(
        encoder=encoder,
        prompt_embed_dim=dim,
        decoder_depth=_count(state_dict, d_layers + r"(\d+)\.norm1\.weight"),
        decoder_mlp_dim=_shape(state_dict, d + "transformer.layers.0.mlp.lin1.weight", 2)[0],
        decoder_num_heads=heads,
        iou_head_depth=_count(state_dict, d_iou + r"(\d+)\.weight"),
        iou_head_hidden_dim=_shape(state_dict, d + "iou_prediction_head.layers.0.weight", 2)[0],
        num_multimask_outputs=_shape(state_dict, d + "mask_tokens.weight", 2)[0] - 1,
        mask_in_chans=_shape(state_dict, "prompt_encoder.mask_downscaling.3.weight", 4)[0],
        ais_head_hidden=(
            _shape(state_dict, "ais_head.net.0.weight", 4)[1]
            if "ais_head.net.0.weight" in state_dict else 0
        ),
        refiner_widths=_unet_widths(state_dict, "mask_refiner"),
        ais_refiner_widths=_unet_widths(state_dict, "ais_refiner"),
    )


def _unet_widths(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, ...]:
    """Channels per level of the U-Net stored under ``prefix.`` (a refiner), () when none."""
    if f"{prefix}.enc.0.0.weight" not in state_dict:
        return ()
    n = _count(state_dict, re.escape(prefix) + r"\.enc\.(\d+)\.0\.weight")
    return tuple(_shape(state_dict, f"{prefix}.enc.{i}.0.weight", 4)[0] for i in range(n))
