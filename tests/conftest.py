import os

import pytest
from hypothesis import settings

# CPU-only test machines are small: keep property tests bounded and free of timing flakiness.
settings.register_profile("infd", deadline=None, max_examples=int(os.environ.get("INFD_HYPOTHESIS_EXAMPLES", "40")))
settings.load_profile("infd")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


TINY_MODEL = dict(
    input_size=32,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    renderer_hidden=16,
    renderer_blocks=2,
)


@pytest.fixture
def make_tiny_model():
    """A tiny random autoencoder (z: 3x8x8 from a 32² input) with any renderer."""
    import torch

    from infd.models import NeuralFieldAutoencoder

    def make(renderer: str = "clif", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return NeuralFieldAutoencoder(**{**TINY_MODEL, "renderer_type": renderer, **overrides}).eval()

    return make
