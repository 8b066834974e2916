"""attention-edit: tuning-free, attention-based image editing for ComfyUI (SD1.x, SD2.x, SDXL)."""

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .nodes import NODES

WEB_DIRECTORY = "./web"


class AttentionEditExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AttentionEditExtension:
    return AttentionEditExtension()
