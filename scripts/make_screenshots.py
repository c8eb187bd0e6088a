"""Regenerate the user guide's screenshots (docs/images/*.png) with a real napari viewer.

    xvfb-run -a -s "-screen 0 1600x1024x24" .venv/bin/python scripts/make_screenshots.py
    ... scripts/make_screenshots.py --only propagate_3d   # one picture (and its group)

Opens the nuclei sample, drives the "Segment Anything" widget through its
scripting API (the same calls the tests use: clicks, commit), then runs
"Segment Everything". The volume pictures use a real 3D stack, BBBC050's
8-cell mouse embryo (``--volume``; default: /work/shared/data/volumes/bbbc050),
copied into a temporary folder so that "precompute all planes" writes its store
beside the file: precompute, a click in one plane, Propagate, commit and a 3D
view, then Segment Everything on the whole stack with "link planes". Uses the
embedded default model when ``napari_sam/weights/default.safetensors`` exists,
otherwise a small model with random weights (its masks are meaningless; the
captions say so). Captions are written to docs/images/CAPTIONS.md (the lines of
pictures not made in this run are kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: wide enough for the interactive widget's stack row and a useful canvas
WINDOW = (1600, 900)


def _random_tiny_model():
    """A small ViT SAM with seeded random weights (fast; for layout-only screenshots)."""
    import torch

    from napari_sam.models import SamConfig, ViTEncoderConfig, build_sam

    torch.manual_seed(0)
    enc = ViTEncoderConfig(
        img_size=256, patch_size=16, embed_dim=64, depth=2, num_heads=2,
        global_attn_indexes=(1,), window_size=4,
    )
    cfg = SamConfig(
        encoder=enc, prompt_embed_dim=64, decoder_depth=2, decoder_mlp_dim=128,
        decoder_num_heads=8, iou_head_hidden_dim=64,
    )
    return build_sam(cfg).eval()


def _pick_model(force_random: bool):
    from napari_sam.models.zoo import embedded_weights_path, load_model

    if not force_random and embedded_weights_path().is_file():
        return load_model("default", device="cpu"), "the embedded default model", False
    return _random_tiny_model(), "a small model with RANDOM weights (no trained model here)", True


def _nuclei_centres(n: int) -> list[tuple[int, int]]:
    """(row, col) centres of the ``n`` largest ground-truth nuclei away from the border."""
    from skimage.measure import regionprops

    from napari_sam.sample_data import nuclei_labels

    gt = nuclei_labels()
    props = [p for p in regionprops(gt) if min(p.bbox[:2]) > 20 and p.bbox[2] < gt.shape[0] - 20
             and p.bbox[3] < gt.shape[1] - 20]
    props.sort(key=lambda p: -p.area)
    return [tuple(int(round(v)) for v in p.centroid) for p in props[:n]]


def _settle(viewer, seconds: float = 0.5) -> None:
    from qtpy.QtCore import QCoreApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QCoreApplication.processEvents()
        time.sleep(0.01)


MAX_BYTES = 400_000  # keep each picture small for the repository
#: the pictures, in the groups that make them (one viewer session per group)
GROUPS: dict[str, tuple[str, ...]] = {
    "nuclei": ("interactive", "everything"),
    "volume": ("precompute", "propagate_plane", "propagate_3d"),
    "stack": ("everything_volume",),
}
NAMES = tuple(name for names in GROUPS.values() for name in names)
BBBC050 = Path("/work/shared/data/volumes/bbbc050")
BBBC050_CITE = ("BBBC050 (Tokuoka et al., npj Syst Biol Appl 6, 32, 2020; CC BY 3.0, "
                "A. Funahashi; Broad Bioimage Benchmark Collection, Ljosa et al., Nature "
                "Methods 9, 637, 2012)")
Z_SPACING = 2.18  # BBBC050: z step about 2.18 x the xy pixel
CONTRAST = (95.0, 1200.0)  # the 8-cell stage's nuclei (uint16, 99.9th percentile ~1130)
#: the nucleus clicked: (z, row, col) inside ground-truth nucleus 3 (planes 7..23)
CLICK = (15, 93, 64)
SHOW_PLANE = 18  # the plane shown after Propagate (not the clicked one)
#: everything_volume.png segments the planes that hold the embryo (ground truth: nuclei on
#: planes 2..45): on the empty end planes the default model keeps noise fragments
STACK_PLANES = (3, 46)


def _save(viewer, path: Path) -> None:
    """Screenshot the whole window into ``path``; quantised to 256 colours (sharp text,
    a third of the bytes) when the plain PNG is larger than MAX_BYTES."""
    from PIL import Image

    _settle(viewer)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(np.ascontiguousarray(shot[..., :3]))
    picture.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"wrote {shown} {shot.shape} {path.stat().st_size // 1000} KB")


def _fail(what: str) -> int:
    print(f"{what} did not finish in time", file=sys.stderr)
    return 1


def _new_viewer(size: tuple[int, int] = WINDOW):
    import napari

    viewer = napari.Viewer(title="napari-sam", show=True)
    viewer.window.resize(*size)
    return viewer


def _fit_dock(viewer, dock) -> None:
    """Give the docked widget the width its rows ask for (the canvas gets the rest)."""
    from qtpy.QtCore import Qt

    _settle(viewer, 0.2)
    width = max(dock.widget().sizeHint().width() + 30, 660)
    viewer.window._qt_window.resizeDocks([dock], [width], Qt.Orientation.Horizontal)


def _turn_3d(viewer, image, labels) -> None:
    """3D view of ``labels`` (surfaces) over the image's maximum intensity projection."""
    image.rendering = "mip"
    image.opacity = 0.5
    labels.rendering = "translucent"
    viewer.layers.selection.active = labels
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    camera = viewer.camera
    camera.angles = (-15.0, 35.0, 75.0)
    camera.zoom *= 0.95


def _nuclei_pictures(model, model_label: str, is_random: bool, out: Path,
                     wanted: set[str]) -> int:
    """interactive.png and everything.png on the nuclei sample."""
    from napari_sam.sample_data import nuclei

    viewer = _new_viewer()
    data, kwargs = nuclei()[0]
    image = viewer.add_image(data, **kwargs)

    # --- interactive widget: three committed nuclei and one live preview
    dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    _fit_dock(viewer, dock)
    widget.set_model(model, label=model_label)
    if not widget.wait_for_embedding(600):
        return _fail("the embedding")
    centres = _nuclei_centres(4)
    for r, c in centres[:3]:
        widget.points_layer.add([[r, c]])
        widget.commit()  # waits for the click's prediction
    r, c = centres[3]
    widget.points_layer.add([[r, c]])
    widget.set_polarity(False)
    widget.points_layer.add([[r + 25, c + 25]])
    widget.set_polarity(True)
    if not widget.wait_for_prediction(600):  # predictions run in a background thread
        return _fail("the prediction")
    viewer.reset_view()
    if "interactive" in wanted:
        _save(viewer, out / "interactive.png")
    widget.clear()

    # --- everything widget, on the same image
    if "everything" in wanted:
        viewer.window.remove_dock_widget(dock)
        for name in ("SAM points", "SAM boxes", "SAM preview"):
            if name in viewer.layers:
                viewer.layers.remove(name)
        dock, everything = viewer.window.add_plugin_dock_widget("napari-sam-kit",
                                                                "Segment Everything")
        _fit_dock(viewer, dock)
        everything.set_model(model, label=model_label)
        everything.set_image_layer(image)
        if is_random:
            everything.set_params(points_per_side=16, pred_iou_thresh=0.0,
                                  stability_score_thresh=0.0)
        everything.run()
        if not everything.wait(600):
            return _fail("Segment Everything")
        for layer in viewer.layers:
            layer.visible = layer is image or layer is everything.result_layer
        _save(viewer, out / "everything.png")
    viewer.close()
    return 0


def _open_volume(viewer, volume: Path, folder: Path, planes: tuple[int, int] | None = None):
    """Copy ``volume`` (its planes ``planes[0]:planes[1]`` when given) into ``folder`` and
    open it as a user does (File > Open), with the embryo's z spacing and contrast;
    returns the image layer."""
    import shutil

    import tifffile

    if planes is None:
        copy = folder / volume.name
        shutil.copyfile(volume, copy)
    else:
        copy = folder / f"{volume.stem}_z{planes[0]}-{planes[1] - 1}.tif"
        tifffile.imwrite(copy, tifffile.imread(volume)[planes[0]:planes[1]])
    (layer,) = viewer.open(str(copy), plugin="napari", scale=(Z_SPACING, 1.0, 1.0),
                           contrast_limits=CONTRAST, colormap="gray")
    return layer


def _goto_plane(viewer, layer, z: int) -> None:
    """Move the z slider to data plane ``z`` (as dragging it does)."""
    point = list(viewer.dims.point)
    point[0] = layer.data_to_world([z, 0, 0])[0]
    viewer.dims.point = point
    _settle(viewer, 0.2)


def _volume_pictures(model, model_label: str, volume: Path, out: Path, wanted: set[str],
                     status: dict[str, str]) -> int:
    """precompute.png, propagate_plane.png and propagate_3d.png on a real 3D stack."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="napari-sam-shots-") as tmp:
        viewer = _new_viewer(WINDOW)
        image = _open_volume(viewer, volume, Path(tmp))
        _goto_plane(viewer, image, CLICK[0])
        dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit",
                                                            "Segment Anything")
        _fit_dock(viewer, dock)
        widget.set_model(model, label=model_label)
        widget.set_stack_axis(0)
        if not widget.wait_for_embedding(600):
            return _fail("the embedding")
        viewer.reset_view()

        # --- precompute all planes: the picture is taken half-way, then it finishes
        widget.precompute()
        bar = widget.stack.progress
        from napari_sam.widgets._common import process_events_until

        process_events_until(lambda: bar.maximum() > 0 and bar.value() >= bar.maximum() // 2,
                             600)
        if "precompute" in wanted:
            _save(viewer, out / "precompute.png")
        if not widget.wait_for_propagation(600):
            return _fail("precomputing")
        _settle(viewer)
        print("precompute:", widget.status.text())

        # --- click in one plane, propagate, show another plane
        z, r, c = CLICK
        widget.points_layer.add([[z, r, c]])
        if not widget.wait_for_prediction(600):
            return _fail("the prediction")
        widget.propagate()
        if not widget.wait_for_propagation(600):
            return _fail("propagation")
        status["propagate"] = widget.status.text()
        print("propagate:", status["propagate"])
        _goto_plane(viewer, image, SHOW_PLANE)
        widget.wait_for_embedding(600)
        if "propagate_plane" in wanted:
            _save(viewer, out / "propagate_plane.png")

        # --- commit (one 3D object) and look at it in 3D
        label = widget.commit()
        print("commit:", label, widget.status.text())
        labels = widget.labels_layer
        for layer in viewer.layers:
            layer.visible = layer is image or layer is labels
        _turn_3d(viewer, image, labels)
        if "propagate_3d" in wanted:
            _save(viewer, out / "propagate_3d.png")
        viewer.close()
    return 0


def _stack_pictures(model, model_label: str, volume: Path, out: Path,
                    status: dict[str, str]) -> int:
    """everything_volume.png: Segment Everything on the whole stack, planes linked."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="napari-sam-shots-") as tmp:
        viewer = _new_viewer(WINDOW)
        image = _open_volume(viewer, volume, Path(tmp), STACK_PLANES)
        dock, everything = viewer.window.add_plugin_dock_widget("napari-sam-kit",
                                                                "Segment Everything")
        _fit_dock(viewer, dock)
        everything.set_model(model, label=model_label)
        everything.set_image_layer(image)
        everything.set_scope("whole stack")
        everything.link_check.setChecked(True)
        everything.run()
        if not everything.wait(1200):
            return _fail("Segment Everything on the stack")
        status["everything_volume"] = everything.status.text()
        print("everything:", status["everything_volume"])
        _turn_3d(viewer, image, everything.result_layer)
        _save(viewer, out / "everything_volume.png")
        viewer.close()
    return 0


HEADER = (
    "# Screenshot captions (written by scripts/make_screenshots.py)\n\n"
    "Data: interactive.png and everything.png show the nuclei sample (DSB2018, CC0; "
    "napari_sam.sample_data). The other pictures show the 8-cell mouse embryo "
    "`8_cell_stage.tif` (51 x 120 x 122 voxels, uint16, fluorescent nuclei; shown with z "
    f"scale {Z_SPACING} and contrast limits {CONTRAST[0]:g}-{CONTRAST[1]:g}) of {BBBC050_CITE}, "
    "from /work/shared/data/volumes/bbbc050 (see its README) unless a caption names another "
    "file.\n\n"
)


def _write_captions(path: Path, captions: dict[str, str]) -> None:
    """Write ``captions`` (picture name -> text) into ``path`` under :data:`HEADER`,
    keeping the lines of the pictures not made in this run."""
    lines: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("- ") and ".png: " in line:
                lines[line[2:line.index(".png: ")]] = line
    for name, text in captions.items():
        lines[name] = f"- {name}.png: {text}"
    ordered = [lines[n] for n in NAMES if n in lines]
    ordered += [line for n, line in lines.items() if n not in NAMES]
    path.write_text(HEADER + "\n".join(ordered) + "\n")


def _captions(model_desc: str, is_random: bool, volume: Path,
              status: dict[str, str]) -> dict[str, str]:
    command = ('`xvfb-run -a -s "-screen 0 1600x1024x24" .venv/bin/python '
               "scripts/make_screenshots.py --only {}`")
    default_volume = volume.resolve() == (BBBC050 / "images" / "8_cell_stage.tif").resolve()
    data = "the embryo" if default_volume else f"`{volume}` (given with --volume)"
    z, r, c = CLICK
    z0, z1 = STACK_PLANES

    def said(key: str) -> str:
        text = status.get(key, "")
        return f" The status line said: *{text}*" if text else ""

    return {
        "interactive": (
            f"the Segment Anything widget on the nuclei sample with {model_desc}: three "
            "committed nuclei, one live preview (cyan outline) from a positive (lime) and a "
            "negative (red) click. " + command.format("interactive")),
        "everything": (
            f"Segment Everything on the nuclei sample with {model_desc}"
            + (" and thresholds set to 0 (random masks)" if is_random else "")
            + ". " + command.format("everything")),
        "precompute": (
            f"the Segment Anything widget half-way through *Precompute all planes* on {data}, "
            f"with {model_desc}: the progress bar and the status line say how many planes are "
            "stored and where (beside a copy of the file in a temporary folder). "
            + command.format("precompute")),
        "propagate_plane": (
            f"one click at (z, row, col) = ({z}, {r}, {c}) of {data}, then *Propagate (G)* "
            f"with {model_desc}; the slider is on plane {SHOW_PLANE}, where the cyan 3D "
            "preview was propagated to (after the move the status line is the plane's "
            "*Ready*)." + said("propagate") + " " + command.format("propagate_plane")),
        "propagate_3d": (
            "the same nucleus after *Commit*: one label on every plane it reached, in "
            f"napari's 3D view (image as MIP), on {data}, with {model_desc}. "
            + command.format("propagate_3d")),
        "everything_volume": (
            "Segment Everything, scope *whole stack*, *link planes* on (IoU 0.30), mode Auto "
            f"(AIS, default thresholds), with {model_desc}, on planes {z0}-{z1 - 1} of {data} "
            "(the planes that hold the embryo: on the empty first and last planes the model "
            "keeps noise fragments): the objects of neighbouring planes are linked into 3D "
            "objects (one colour each), shown in the 3D view." + said("everything_volume")
            + " " + command.format("everything_volume")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--random", action="store_true", help="use a random tiny model")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                        help="make only this picture (the other steps of its group run, unsaved); "
                             "repeat for more. One of: " + ", ".join(NAMES))
    parser.add_argument("--volume", type=Path,
                        default=BBBC050 / "images" / "8_cell_stage.tif",
                        help="the 3D TIFF of the volume pictures (default: %(default)s)")
    args = parser.parse_args(argv)
    wanted = set(args.only or NAMES)
    model, model_desc, is_random = _pick_model(args.random)
    model_label = "random tiny model" if is_random else "default"
    if wanted & set(GROUPS["volume"] + GROUPS["stack"]) and not args.volume.is_file():
        print(f"the volume {args.volume} does not exist; pass --volume", file=sys.stderr)
        return 1

    made: set[str] = set()
    status: dict[str, str] = {}  # the widgets' status lines, quoted in the captions
    if wanted & set(GROUPS["nuclei"]):
        if _nuclei_pictures(model, model_label, is_random, args.out, wanted):
            return 1
        made |= wanted & set(GROUPS["nuclei"])
    if wanted & set(GROUPS["volume"]):
        if _volume_pictures(model, model_label, args.volume, args.out, wanted, status):
            return 1
        made |= wanted & set(GROUPS["volume"])
    if "everything_volume" in wanted:
        if _stack_pictures(model, model_label, args.volume, args.out, status):
            return 1
        made.add("everything_volume")
    captions = _captions(model_desc, is_random, args.volume, status)
    _write_captions(args.out / "CAPTIONS.md", {n: captions[n] for n in made})
    print(f"model: {model_desc}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
