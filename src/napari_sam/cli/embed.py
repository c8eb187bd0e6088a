"""``napari-sam embed``: the embeddings of every plane (and tile) of an image, on disk."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import (
    Console,
    UsageError,
    common_options,
    load_model,
    model_options,
    non_negative_int,
)


def _tile_size(text: str) -> int | str | None:
    from napari_sam.engine.everything_settings import MIN_TILE_SIZE

    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        value = MIN_TILE_SIZE - 1
    if value < MIN_TILE_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'none' or an integer >= {MIN_TILE_SIZE}, got {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Add ``embed`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "embed", help="precompute the embeddings of every plane of an image into a zarr store",
        description="Compute the image embeddings of every plane of an image (a 2D image, or "
                    "each plane of a TIFF stack) and of every tile where tiling applies, and "
                    "write them to a zarr store, one chunk per plane or tile. The store is "
                    "signed with the model's weights, the image's checksum, the normalisation "
                    "and the tiling: running again is a no-op, an interrupted run resumes, and "
                    "a store made for another model or image is refused (--overwrite replaces "
                    "it). Predictor(model, store=EmbeddingStore.open(STORE)) reads it.",
    )
    common_options(p, suppress=True)
    p.add_argument("image", type=Path, help="image file (.png, .tif with a stack, ...)")
    p.add_argument("-o", "--out", type=Path, default=None, metavar="STORE.zarr",
                   help="the store (a folder ending in .zarr; default: IMAGE.sam.zarr beside "
                        "the image, where napari-sam looks for it)")
    model_options(p)
    p.add_argument("--tile-size", type=_tile_size, default="auto", metavar="auto|none|PX",
                   help="also embed tiles of planes larger than PX pixels; auto: "
                        "everything-mode's own rule (planes over 3 x the model input get tiles "
                        "of 2 x the model input); none: whole planes only (default: auto)")
    p.add_argument("--tile-overlap", type=non_negative_int, default=None, metavar="PX",
                   help="overlap of neighbouring tiles (default: 1/8 of the tile, as "
                        "everything-mode's automatic tiles)")
    p.add_argument("--channels-as-planes", action="store_true",
                   help="read colour samples (RGB) as planes of a stack")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store (also one made for another model or image)")
    p.set_defaults(func=_cmd_embed)


class _Bar:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line per
    plane otherwise)."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.tty = bool(getattr(console.err, "isatty", lambda: False)())

    def update(self, done: int, plane: tuple[int, ...], is_plane: bool) -> None:
        if self.console.quiet:
            return
        width = 30
        filled = round(width * done / max(self.total, 1))
        where = f"plane {plane}" if plane else "image"
        line = f"embedding [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {where}"
        if self.tty:
            end = "\n" if done == self.total else ""
            print(f"\r{line}", end=end, file=self.console.err, flush=True)
        elif is_plane or done == self.total:
            print(line, file=self.console.err, flush=True)


def _cmd_embed(args: argparse.Namespace, console: Console) -> int:
    from napari_sam.engine.io import read_image
    from napari_sam.engine.store import (
        STORE_SUFFIX,
        EmbedProgress,
        embed_to_store,
        store_path_for,
    )

    out: Path = args.out if args.out is not None else store_path_for(args.image)
    if out.suffix.lower() != ".zarr":
        raise UsageError(f"--out must be a folder ending in .zarr (e.g. "
                         f"{args.image.name}{STORE_SUFFIX}), got {out.name!r}")
    if args.tile_overlap is not None and isinstance(args.tile_size, int) \
            and args.tile_overlap >= args.tile_size:
        raise UsageError(f"--tile-overlap ({args.tile_overlap}) must be smaller than "
                         f"--tile-size ({args.tile_size})")
    image = read_image(args.image, channels_as_planes=args.channels_as_planes)
    if image.notice:
        console.note(image.notice)
    model = load_model(args.model, args.device, console)

    from napari_sam.engine.predictor import Predictor

    predictor = Predictor(model, cache_bytes=0)
    plane_box = (0, 0, *image.plane_shape)
    bar: list[_Bar] = []

    def progress(step: EmbedProgress) -> None:
        if not bar:
            bar.append(_Bar(console, step.total))
        bar[0].update(step.done, step.plane, step.box == plane_box)

    result = embed_to_store(
        predictor, image.data, out, progress=progress, rgb=image.rgb,
        contrast_limits=image.contrast_limits(), model_name=args.model or "default",
        tile_size=args.tile_size, overlap=args.tile_overlap, overwrite=args.overwrite,
    )
    if result.status == "up to date":
        console.info(f"{out} is up to date ({result.total} embeddings of this model and image); "
                     "nothing to do")
    elif result.status == "resumed":
        console.info(f"resumed {out}: computed the {result.computed} missing of "
                     f"{result.total} embeddings")
    else:
        console.info(f"wrote {result.total} embeddings")
    console.result(str(out))
    return 0
