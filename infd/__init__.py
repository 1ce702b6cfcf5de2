"""infd: image neural field diffusion.

Images are latents that decode to a neural field, rendered at any resolution, region and
aspect ratio. Start with `infd.rendering.encode` / `infd.rendering.render`.
"""

from infd.errors import InfdError

__version__ = "0.1.0"
__all__ = ["InfdError", "__version__"]
