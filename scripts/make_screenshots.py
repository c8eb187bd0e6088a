"""Regenerate the user guide's screenshots (docs/images/*.png) with a real napari viewer.

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python scripts/make_screenshots.py

Opens the nuclei sample, drives the "Segment Anything" widget through its
scripting API (the same calls the tests use: clicks, commit), then runs
"Segment Everything". Uses the embedded default model when
``napari_sam/weights/default.safetensors`` exists, otherwise a small model with
random weights (its masks are meaningless; the captions say so). Captions are
written to docs/images/CAPTIONS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1280, 860)


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


def _save(viewer, path: Path) -> None:
    from skimage.io import imsave

    _settle(viewer)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, shot, check_contrast=False)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} {shot.shape}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--random", action="store_true", help="use a random tiny model")
    args = parser.parse_args(argv)

    import napari

    from napari_sam.sample_data import nuclei

    model, model_desc, is_random = _pick_model(args.random)
    model_label = "random tiny model" if is_random else "default"
    viewer = napari.Viewer(title="napari-sam", show=True)
    viewer.window.resize(*WINDOW)
    data, kwargs = nuclei()[0]
    image = viewer.add_image(data, **kwargs)

    # --- interactive widget: three committed nuclei and one live preview
    dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    widget.set_model(model, label=model_label)
    if not widget.wait_for_embedding(600):
        print("the embedding did not finish in time", file=sys.stderr)
        return 1
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
        print("the prediction did not finish in time", file=sys.stderr)
        return 1
    viewer.reset_view()
    _save(viewer, args.out / "interactive.png")
    widget.clear()

    # --- everything widget, on the same image
    viewer.window.remove_dock_widget(dock)
    for name in ("SAM points", "SAM boxes", "SAM preview"):
        if name in viewer.layers:
            viewer.layers.remove(name)
    _, everything = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Everything")
    everything.set_model(model, label=model_label)
    everything.set_image_layer(image)
    if is_random:
        everything.set_params(points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    everything.run()
    if not everything.wait(600):
        print("Segment Everything did not finish in time", file=sys.stderr)
        return 1
    for layer in viewer.layers:
        layer.visible = layer is image or layer is everything.result_layer
    _save(viewer, args.out / "everything.png")

    captions = args.out / "CAPTIONS.md"
    captions.write_text(
        "# Screenshot captions (written by scripts/make_screenshots.py)\n\n"
        f"- interactive.png: the Segment Anything widget on the nuclei sample with "
        f"{model_desc}: three committed nuclei, one live preview (cyan outline) from a "
        "positive (lime) and a negative (red) click.\n"
        f"- everything.png: Segment Everything on the nuclei sample with {model_desc}"
        + (" and thresholds set to 0 (random masks)" if is_random else "")
        + ".\n"
    )
    print(f"model: {model_desc}")
    viewer.close()
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
