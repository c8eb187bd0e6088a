#!/usr/bin/env bash
# The main job: set up the environment, then run everything-mode with the embedded default model
# on the bundled nuclei image (no network needed). Writes out/nuclei_labels.tif and
# out/nuclei_overlay.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/napari-sam everything src/napari_sam/data/nuclei.png --out out --overlay --overwrite
.venv/bin/python - <<'PY'
import numpy as np, tifffile
labels = tifffile.imread("out/nuclei_labels.tif")
print(f"demo: {len(np.unique(labels)) - 1} objects segmented -> out/nuclei_labels.tif, out/nuclei_overlay.png")
PY
