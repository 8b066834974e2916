"""ComfyUI-facing machinery shared by the nodes: patch registration, inversion, branch sampling."""
