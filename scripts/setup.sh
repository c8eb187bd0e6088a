#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   bash scripts/setup.sh          # library + napari + test extras
# Installs torch==2.13.0 first (the CPU wheel; a plain `torch` would pull a multi-GB CUDA build),
# then the package in editable mode with its test extras, then the system packages that headless
# napari tests need (Xvfb), when run as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

install_system_packages() {
    local pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 \
libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-shape0 libgl1 libegl1 \
libfontconfig1 libdbus-1-3"
    if command -v xvfb-run >/dev/null 2>&1 && ldconfig -p | grep -q libxcb-cursor; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != "0" ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "setup: not root and no sudo: install these packages yourself: $pkgs" >&2
            return 0
        fi
    fi
    echo "setup: installing system packages for headless napari (Xvfb) ..." >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $pkgs >/dev/null
}

if [ "${SKIP_SYSTEM_PACKAGES:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1; then
    install_system_packages
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV ..." >&2
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
# torch first and pinned: a CPU wheel, so nothing below pulls a CUDA build.
"${PIP[@]}" install -q "torch==2.13.0"
# The distribution was named napari-sam before it became napari-sam-kit (napari-sam on PyPI is
# an unrelated plugin). An install under the old name would stay beside the new one, with a
# plugin entry point that napari now refuses: remove it.
if "${PIP[@]}" show -q napari-sam >/dev/null 2>&1; then
    echo "setup: removing the install under the old name napari-sam ..." >&2
    "${PIP[@]}" uninstall -q -y napari-sam
fi
"${PIP[@]}" install -q -e ".[testing]" "torch==2.13.0"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, napari_sam; print("torch", torch.__version__, "napari-sam", napari_sam.__version__)'))" >&2
