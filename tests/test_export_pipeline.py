"""scripts/export_pipeline.py: a decoder fine-tuned with a frozen encoder may replace a pipeline's autoencoder."""

import importlib.util
from pathlib import Path

import pytest
import torch

from infd.errors import InfdError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_pipeline.py"


def load_script():
    spec = importlib.util.spec_from_file_location("export_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swap_decoder_takes_the_latent_scale_and_refuses_another_encoder(make_tiny_model, tmp_path):
    swap_decoder = load_script().swap_decoder
    trained_on = make_tiny_model("clif", scaling_factor=1.7, shift_factor=0.1)
    finetuned = make_tiny_model("clif")
    finetuned.load_state_dict(trained_on.state_dict())
    with torch.no_grad():
        finetuned.decoder.conv_in.weight.add_(0.1)
    finetuned.save_pretrained(tmp_path / "decoder")
    swapped = swap_decoder(trained_on, tmp_path / "decoder")
    assert swapped.config.scaling_factor == 1.7 and swapped.config.shift_factor == 0.1
    assert torch.equal(swapped.decoder.conv_in.weight, finetuned.decoder.conv_in.weight)
    with torch.no_grad():
        finetuned.encoder.conv_in.weight.add_(0.1)
    finetuned.save_pretrained(tmp_path / "other")
    with pytest.raises(InfdError, match="freeze_encoder"):
        swap_decoder(trained_on, tmp_path / "other")
