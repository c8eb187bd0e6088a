#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the whole test suite under a virtual display.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
# Run napari under Xvfb: QT_QPA_PLATFORM=offscreen cannot render napari's canvas.
if command -v xvfb-run >/dev/null 2>&1; then
    exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@"
elif [ -n "${DISPLAY:-}" ]; then
    exec .venv/bin/python -m pytest "$@"
else
    echo "test: no xvfb-run and no DISPLAY: install xvfb (see scripts/setup.sh)" >&2
    exit 3
fi
