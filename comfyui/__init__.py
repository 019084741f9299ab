"""ScaleCrafter and FreeScale as ComfyUI nodes acting on ComfyUI's MODEL (docs/comfyui.md).

Install: link or copy this folder into ComfyUI/custom_nodes/ (e.g. ``ln -s $PWD/comfyui
ComfyUI/custom_nodes/scalecrafter``); the nodes import this repository's ``ldm`` package, found through
``pip install -e .`` of the repository or, failing that, from the folder above this one.
"""
import sys
from pathlib import Path

try:
    import ldm.unet_hooks.processors  # noqa: F401  (this repository's ldm, not another package's)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
