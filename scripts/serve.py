"""`make serve`: ComfyUI with the pack on 127.0.0.1:PORT in the foreground, demo model available."""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import comfy_host  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8188)
    args = parser.parse_args()
    comfy_host.add_host_to_path()
    comfy_host.register_pack()
    from attention_edit.toyworld.model import demo_model_file

    demo_model_file(str(REPO / "models"))
    base = pathlib.Path.home() / ".cache" / "attention-edit" / "serve-base"
    comfy_host.prepare_base_directory(base)
    print(f"ComfyUI with attention-edit at http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    comfy_host.serve_foreground(["--base-directory", str(base), "--port", str(args.port)])


if __name__ == "__main__":
    main()
