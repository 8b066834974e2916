"""The ComfyUI host the tests run on: where it lives, how to import it, how to run it.

The tree is the one scripts/bootstrap.sh set up for this virtual environment (recorded in
`<venv>/attn-edit-host`: upstream 0.33.0 for `.venv`, 0.3.75 for `.venv-0.3.75`), or ATTN_EDIT_HOST.

Used by the tests, `make demo`, `make serve` and the benchmarks. Never imported by the pack.

    python scripts/comfy_host.py serve --base-directory DIR --port 8188
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import runpy
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]


def _host_dir() -> pathlib.Path:
    if os.environ.get("ATTN_EDIT_HOST"):
        return pathlib.Path(os.environ["ATTN_EDIT_HOST"]).resolve()
    record = pathlib.Path(sys.prefix) / "attn-edit-host"
    if record.exists():
        return pathlib.Path(record.read_text().strip())
    raise RuntimeError(f"no ComfyUI host recorded for {sys.prefix}: run `make setup` (or set ATTN_EDIT_HOST)")


HOST_DIR = _host_dir()


def host_version() -> str:
    """The host tree's own version string (comfyui_version.py), e.g. '0.33.0'."""
    text = (HOST_DIR / "comfyui_version.py").read_text()
    return re.search(r"__version__\s*=\s*[\"']([^\"']+)", text).group(1)


def host_version_tuple() -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", host_version())[:3])


PACK_FOLDER_NAME = "attention-edit"
log = logging.getLogger("attention_edit.host")

_torchvision_ops = None


def install_torchvision_shim() -> None:
    """Make the CUDA-only torchvision wheel importable beside the CPU torch (design guide §1).

    Declares the two op schemas its import registers fakes for; the compiled ops stay unusable and
    nothing on the SD path calls them. Only done when the plain import fails.
    """
    global _torchvision_ops
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError:
        pass
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _torchvision_ops = torch.library.Library("torchvision", "DEF")  # kept alive on purpose
    _torchvision_ops.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_ops.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def add_host_to_path() -> None:
    """Make `import comfy...` work in this process (tests, benchmarks)."""
    if not (HOST_DIR / "main.py").exists():
        raise RuntimeError(f"ComfyUI host not found at {HOST_DIR}: run scripts/bootstrap.sh (make test does)")
    install_torchvision_shim()
    if str(HOST_DIR) not in sys.path:
        sys.path.insert(0, str(HOST_DIR))
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():  # the host would otherwise ask CUDA for a device at import
        comfy.cli_args.args.cpu = True


def register_pack(name: str = "attention_edit") -> None:
    """Make the pack importable as `name` in this process without running its __init__.

    The pure modules (attention/) import without ComfyUI this way; nodes/ and engine/ need the host
    on sys.path (add_host_to_path). ComfyUI itself loads the pack through __init__.
    """
    import types

    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(REPO)]
        sys.modules[name] = package


def prepare_base_directory(base: pathlib.Path) -> pathlib.Path:
    """A ComfyUI base directory with this pack in custom_nodes/ and the usual model folders."""
    base = pathlib.Path(base)
    for sub in ("custom_nodes", "models/checkpoints", "models/vae", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER_NAME
    if link.is_symlink() and link.resolve() != REPO:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI as a subprocess on a loopback port with the pack loaded; stopped by its pid."""

    def __init__(self, base: pathlib.Path, port: int | None = None, log_path: pathlib.Path | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.base = prepare_base_directory(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = pathlib.Path(log_path or self.base / "comfyui.log")
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> ComfyServer:
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "serve", "--base-directory", str(self.base),
               "--port", str(self.port), *self.extra_args]
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(HOST_DIR))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} failed with {e.code}: {e.read().decode(errors='replace')}") from e

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Wait for a queued prompt; return its /history entry. Raises on an execution error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    if status.get("status_str") != "success":
                        raise RuntimeError(f"prompt failed: {_error_summary(status)}")
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, history_entry: dict) -> list[pathlib.Path]:
        files = []
        for node_out in history_entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                folder = self.base / img.get("type", "output") / img.get("subfolder", "")
                files.append(folder / img["filename"])
        return files


def _error_summary(status: dict) -> str:
    """The node and message of an execution error in a /history status (not the whole input dump)."""
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message', '').strip()}"
    return json.dumps(status.get("messages"))[-2000:]


def _serve(argv: list[str]) -> None:
    install_torchvision_shim()
    os.chdir(HOST_DIR)
    sys.path.insert(0, str(HOST_DIR))
    base = None
    if "--base-directory" in argv:
        base = pathlib.Path(argv[argv.index("--base-directory") + 1])
        prepare_base_directory(base)
    # The default database lives in the host tree's user/ folder, which the cached tree lacks: the host
    # would log "Failed to initialize database" on every start. An in-memory one is all a run needs.
    db = [] if "--database-url" in argv else ["--database-url", "sqlite:///:memory:"]
    args = ["main.py", "--cpu", "--listen", "127.0.0.1", *db, *argv]
    sys.argv = args
    runpy.run_path(str(HOST_DIR / "main.py"), run_name="__main__")


def serve_foreground(argv: list[str]) -> None:
    """Run the host in a child process in the foreground (a fresh interpreter: the host owns its imports)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "serve", *argv]
    try:
        subprocess.run(cmd, cwd=str(HOST_DIR), check=False)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "serve":
        sys.exit(__doc__)
    _serve(sys.argv[2:])
