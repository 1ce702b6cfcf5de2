"""ComfyUI custom nodes for infd: link or copy this folder into ComfyUI/custom_nodes/ (docs/comfyui.md).

infd itself must be installed in ComfyUI's Python (`pip install -e /path/to/infd`).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
