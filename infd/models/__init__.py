"""Models: the neural-field autoencoder, its renderers and the patch discriminator."""

from infd.models.autoencoder import NeuralFieldAutoencoder
from infd.models.renderers import RENDERERS, CLIFRenderer, FixedResolutionRenderer, LIIFRenderer, make_renderer

__all__ = ["NeuralFieldAutoencoder", "RENDERERS", "CLIFRenderer", "LIIFRenderer", "FixedResolutionRenderer", "make_renderer"]
