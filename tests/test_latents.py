"""The latent cache: shards + index, resumable, bad files skipped; single latent files."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from infd import rendering
from infd.errors import InfdError
from infd.latents import LatentCache, encode_folder, latent_std, load_latent, save_latent, weights_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def folder_with_bad_files(image_folder):
    (image_folder / "broken.png").write_bytes(b"not an image at all")
    (image_folder / "sub").mkdir()
    (image_folder / "sub" / "truncated.png").write_bytes((image_folder / "img0.png").read_bytes()[:200])
    return image_folder


def test_cache_holds_every_readable_image_and_counts_the_rest(make_tiny_model, folder_with_bad_files, tmp_path):
    model = make_tiny_model()
    cache = encode_folder(model, folder_with_bad_files, tmp_path / "lat", shard_size=3, batch_size=2, num_workers=0, progress=False)
    assert len(cache) == 6 and cache.latent_shape == (3, 8, 8)
    assert cache.mean.shape == cache.logvar.shape == (6, 3, 8, 8)
    assert sum(cache.index["skipped"].values()) == 2
    assert sorted(name for name, _ in cache.index["skipped_files"]) == ["broken.png", os.path.join("sub", "truncated.png")]
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["index.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    for name, mean in zip(cache.files, cache.mean, strict=True):  # the same latent as encoding the file on its own
        expected = rendering.encode(model, folder_with_bad_files / name)[0]
        assert torch.allclose(mean, expected, atol=1e-5), name
    assert cache.fingerprint == weights_fingerprint(model)


def test_an_interrupted_cache_resumes_without_redoing_finished_shards(make_tiny_model, image_folder, tmp_path):
    model = make_tiny_model()
    out = tmp_path / "lat"
    full = encode_folder(model, image_folder, out, shard_size=2, num_workers=0, progress=False)
    (out / "index.json").unlink()  # as if killed before the end ...
    (out / "shard_00002.safetensors").unlink()  # ... while writing the last shard
    with pytest.raises(InfdError, match="not a finished latent cache"):
        LatentCache.open(out)
    kept = (out / "shard_00000.safetensors").stat().st_mtime_ns
    resumed = encode_folder(model, image_folder, out, shard_size=2, num_workers=0, progress=False)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == kept
    assert resumed.files == full.files and torch.equal(resumed.mean, full.mean)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_another_autoencoder_cannot_add_to_a_cache(make_tiny_model, image_folder, tmp_path):
    encode_folder(make_tiny_model(seed=0), image_folder, tmp_path / "lat", num_workers=0, progress=False)
    with pytest.raises(InfdError, match="another autoencoder"):
        encode_folder(make_tiny_model(seed=1), image_folder, tmp_path / "lat", num_workers=0, progress=False)


def test_vq_latents_have_no_logvar(make_tiny_model, image_folder, tmp_path):
    cache = encode_folder(make_tiny_model(latent_type="vq", vq_codebook_size=16), image_folder, tmp_path / "lat", num_workers=0, progress=False)
    assert cache.logvar is None and len(cache) == 6


def test_bad_inputs_are_clear_errors(make_tiny_model, tmp_path):
    model = make_tiny_model()
    with pytest.raises(InfdError, match="does not exist"):
        encode_folder(model, tmp_path / "nope", tmp_path / "lat", progress=False)
    with pytest.raises(InfdError, match="does not exist"):
        LatentCache.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfdError, match="no images"):
        encode_folder(model, tmp_path / "empty", tmp_path / "lat", progress=False)
    assert not (tmp_path / "lat").exists()


def test_latent_std_accounts_for_the_posterior():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2000, 3, 4, 4, generator=generator) * 2 + 1
    logvar = torch.full_like(mean, -1.0)
    draws = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    assert latent_std(mean, logvar) == pytest.approx(float(draws.std()), rel=0.01)
    assert latent_std(mean) == pytest.approx(float(mean.std()), rel=1e-3)


def test_latent_files_round_trip_and_refuse_garbage(tmp_path):
    z = torch.randn(1, 3, 8, 8)
    save_latent(tmp_path / "a.z.safetensors", z, {"seed": 7, "sampler": "ddim"})
    again, metadata = load_latent(tmp_path / "a.z.safetensors")
    assert torch.equal(again, z) and metadata["seed"] == "7" and metadata["sampler"] == "ddim"
    save_latent(tmp_path / "b.z.safetensors", z[0])
    assert load_latent(tmp_path / "b.z.safetensors")[0].shape == (1, 3, 8, 8)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    save_file({"other": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for bad in ("junk.safetensors", "other.safetensors"):
        with pytest.raises(InfdError, match="not a latent file"):
            load_latent(tmp_path / bad)
    with pytest.raises(InfdError, match="does not exist"):
        load_latent(tmp_path / "missing.safetensors")


def test_index_describes_the_cache(make_tiny_model, image_folder, tmp_path):
    encode_folder(make_tiny_model(), image_folder, tmp_path / "lat", shard_size=4, num_workers=0, progress=False)
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert index["count"] == 6 and index["latent_shape"] == [3, 8, 8] and index["latent_type"] == "kl"
    assert [s["count"] for s in index["shards"]] == [4, 2]
