"""Training configs that extend another (`base`), resolved once; every shipped config loads."""

import json
from pathlib import Path

import pytest

from infd.errors import InfdError
from infd.store import read_config_file
from infd.training.autoencoder import AETrainConfig
from infd.training.ldm import LDMTrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values))
    return path


def test_a_config_extends_its_base_key_by_key(tmp_path):
    write(tmp_path / "base.json", {"lr": 0.001, "batch_size": 32, "model": {"renderer_type": "clif", "renderer_hidden": 64}, "data": {"crop_size": 128}})
    (tmp_path / "sub").mkdir()
    own = write(tmp_path / "sub" / "small.json", {"base": "../base.json", "batch_size": 8, "model": {"renderer_hidden": 16}})
    assert read_config_file(own) == {"lr": 0.001, "batch_size": 8, "model": {"renderer_type": "clif", "renderer_hidden": 16}, "data": {"crop_size": 128}}
    # Resolved once: the config a run saves (train_config.json) holds no base and every value.
    saved = AETrainConfig.load(own).to_dict()
    assert "base" not in saved and saved["model"] == {"renderer_type": "clif", "renderer_hidden": 16} and saved["data"]["crop_size"] == 128


def test_bases_chain_and_a_loop_is_refused(tmp_path):
    write(tmp_path / "a.json", {"lr": 0.5})
    write(tmp_path / "b.json", {"base": "a.json", "steps": 7})
    assert read_config_file(write(tmp_path / "c.json", {"base": "b.json"})) == {"lr": 0.5, "steps": 7}
    write(tmp_path / "x.json", {"base": "y.json"})
    write(tmp_path / "y.json", {"base": "x.json"})
    with pytest.raises(InfdError, match="extends it again"):
        read_config_file(tmp_path / "x.json")
    with pytest.raises(InfdError, match="does not exist"):
        read_config_file(write(tmp_path / "d.json", {"base": "missing.json"}))
    with pytest.raises(InfdError, match="must be the path"):
        read_config_file(write(tmp_path / "e.json", {"base": 3}))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config_class = LDMTrainConfig if path.name.startswith("ldm") else AETrainConfig
    config = config_class.load(path)
    config.validate()


def test_the_cpu_and_liif_recipes_differ_from_the_gpu_one_only_where_they_say():
    gpu, cpu, liif = (AETrainConfig.load(CONFIGS / f"{name}.json").to_dict() for name in ("ae-wallpapers", "ae-wallpapers-cpu", "ae-wallpapers-liif"))
    assert cpu["model"]["trunk_type"] == gpu["model"]["trunk_type"] == "sr" and cpu["lr"] == gpu["lr"]
    assert cpu["batch_size"] == 8 and gpu["batch_size"] == 32
    assert {k for k in gpu["model"] if gpu["model"][k] != liif["model"].get(k)} == {"renderer_type"}  # only the detail network
    assert {k for k in gpu if k != "model" and gpu[k] != liif[k]} == set()
    cpu_liif, finetune = (AETrainConfig.load(CONFIGS / f"{name}.json").to_dict() for name in ("ae-wallpapers-cpu-liif", "ae-wallpapers-cpu-finetune"))
    assert {k for k in cpu["model"] if cpu["model"][k] != cpu_liif["model"].get(k)} == {"renderer_type"}
    assert {k for k in cpu if k != "model" and cpu[k] != cpu_liif[k]} == set()
    assert {k for k in cpu if cpu[k] != finetune[k]} == {"data", "freeze_encoder", "lr"} and finetune["data"]["crop_sampling"] == "cover"


@pytest.mark.parametrize(
    "model, key",
    [({"latent_channels": "3"}, "latent_channels"), ({"block_out_channels": 64}, "block_out_channels"), ({"residual_renderer": "yes"}, "residual_renderer"), ({"renderer_hiden": 8}, "renderer_hiden")],
)
def test_a_bad_model_option_is_one_sentence_naming_the_key(model, key):
    with pytest.raises(InfdError, match=key):
        AETrainConfig.from_dict({"model": model})
