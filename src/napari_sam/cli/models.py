"""``napari-sam models list|download|path``: the model zoo's checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from napari_sam.errors import ModelNotFoundError

from ._common import Console, common_options, with_valid_names, zoo_module


def add_parser(sub: Any) -> None:
    """Add ``models`` and its actions to the subparsers ``sub``."""
    p_models = sub.add_parser("models", help="list, download and locate model checkpoints",
                              description="List, download and locate model checkpoints.")
    common_options(p_models, suppress=True)
    msub = p_models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="list the models (name, size, cached?, description)",
                        description="List the models of the zoo.")
    common_options(p, suppress=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="checkpoint cache folder to look in (default: see 'models path')")
    p.set_defaults(func=_cmd_models_list)
    p = msub.add_parser("download", help="download a checkpoint; prints its path",
                        description="Download (and hash-check) a checkpoint into the cache; "
                                    "prints its path. An already cached file is only checked "
                                    "(models without a published hash, EfficientSAM: against "
                                    "the sha256 recorded at their first download).")
    common_options(p, suppress=True)
    p.add_argument("name", help="model name (see 'napari-sam models list')")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="download into this folder instead of the cache "
                        "(default: $NAPARI_SAM_CACHE or the user cache folder)")
    p.set_defaults(func=_cmd_models_download)
    p = msub.add_parser("path", help="print where a checkpoint is cached",
                        description="Print the path where a model's checkpoint is (or would be) "
                                    "cached. Exit code 1 if it has not been downloaded yet.")
    common_options(p, suppress=True)
    p.add_argument("name", help="model name")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache folder to look in")
    p.set_defaults(func=_cmd_models_path)


def _model_local_path(zoo: Any, name: str, cache_dir: Path | None) -> Path:
    """Where ``name``'s checkpoint is (or would be) on disk.

    Zoo downloads live in the cache folder; the embedded default model inside
    the package.
    """
    info = zoo.model_info(name)
    if not getattr(info, "url", ""):
        return Path(zoo.embedded_weights_path())
    folder = Path(cache_dir).expanduser() if cache_dir is not None else Path(zoo.cache_dir())
    return folder / info.filename



def _cmd_models_list(args: argparse.Namespace, console: Console) -> int:
    zoo = zoo_module()
    rows = []
    for name in zoo.list_models():
        info = zoo.model_info(name)
        path = _model_local_path(zoo, name, args.cache_dir)
        size_mb = float(info.size_mb)
        if not info.url and path.is_file():  # embedded: its file size
            size_mb = path.stat().st_size / 2**20
        rows.append({
            "name": name,
            "size_mb": size_mb,
            "cached": path.is_file(),
            "path": str(path),
            "description": info.description,
        })
    if args.json:
        console.result(json.dumps(rows, indent=2))
        return 0
    width = max([4, *(len(r["name"]) for r in rows)])
    console.result(f"{'NAME':<{width}}  {'SIZE':>8}  {'CACHED':<6}  DESCRIPTION")
    for r in rows:
        size = f"{r['size_mb']:.0f} MB" if r["size_mb"] >= 1 else "< 1 MB"
        console.result(f"{r['name']:<{width}}  {size:>8}  {'yes' if r['cached'] else 'no':<6}  "
                       f"{r['description']}")
    return 0


def _cmd_models_download(args: argparse.Namespace, console: Console) -> int:
    zoo = zoo_module()
    try:
        path = zoo.download_checkpoint(args.name, cache_dir=args.cache_dir,
                                       progress=not console.quiet)
    except ModelNotFoundError as err:
        raise with_valid_names(err) from err
    console.result(str(path))
    return 0


def _cmd_models_path(args: argparse.Namespace, console: Console) -> int:
    zoo = zoo_module()
    try:
        path = _model_local_path(zoo, args.name, args.cache_dir)
    except ModelNotFoundError as err:
        raise with_valid_names(err) from err
    console.result(str(path))
    if not path.is_file():
        if path.parent == Path(zoo.embedded_weights_path()).parent:
            console.warn("the embedded model file is missing; reinstall napari-sam-kit")
        else:
            console.warn(f"not downloaded yet; run: napari-sam models download {args.name}")
        return 1
    return 0
