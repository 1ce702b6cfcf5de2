"""eval-ae and eval-gen: the right ground truth at each scale, the right patches, reports, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_pattern_image
from PIL import Image
from typer.testing import CliRunner

from infd import evaluation, rendering
from infd.cli import app
from infd.errors import InfdError
from infd.evaluation import metrics
from infd.images import load_image, resize

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def l1_per_image(pred, target):
    """A cheap stand-in with LPIPS's signature (building a VGG costs seconds)."""
    return (pred - target).abs().flatten(1).mean(1).double().cpu()


@pytest.fixture
def ckpt(make_tiny_model, tmp_path):
    folder = tmp_path / "ckpt"
    make_tiny_model("clif", fixed_head=True).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- shared pieces


def test_scales_and_sizes():
    assert evaluation.parse_scales("512, 256,512") == [256, 512]
    for bad in ("", "abc", "256,16", "0"):
        with pytest.raises(InfdError, match="scales"):
            evaluation.parse_scales(bad)
    assert evaluation.scaled_size((1152, 2048), 512) == (288, 512)  # long side, native aspect
    assert evaluation.scaled_size((1152, 2048), 512, "short") == (512, 910)
    assert evaluation.scaled_size((2048, 2048), 256) == (256, 256)


def test_model_specs():
    spec = evaluation.ModelSpec.parse("base=runs/ae:fixed")
    assert (spec.label, spec.path, spec.renderer) == ("base", Path("runs/ae"), "fixed")
    assert evaluation.ModelSpec.parse("x=C:/runs/ae").path == Path("C:/runs/ae")  # a colon that names no renderer stays in the path
    with pytest.raises(InfdError, match="LABEL=PATH"):
        evaluation.ModelSpec.parse("runs/ae")


def test_holdout_selection(tmp_path):
    for name in ("Kite.jpg", "Opal.jpg", "train.jpg"):
        write_pattern_image(tmp_path / name, 16, 16)
    paths, missing = evaluation.select_images(tmp_path, holdout=True)
    assert [p.name for p in paths] == ["Kite.jpg", "Opal.jpg"]
    assert "Altai.jpg" in missing and "Kite.jpg" not in missing
    assert [p.name for p in evaluation.select_images(tmp_path, limit=1)[0]] == ["Kite.jpg"]
    (tmp_path / "other").mkdir()
    write_pattern_image(tmp_path / "other" / "x.png", 16, 16)
    with pytest.raises(InfdError, match="none of the held-out files"):
        evaluation.select_images(tmp_path / "other", holdout=True)


# ---------------------------------------------------------------- eval-ae


def test_eval_ae_compares_models_on_the_same_ground_truth(make_tiny_model, image_folder, tmp_path, one_torch_thread):
    clif = make_tiny_model("clif", fixed_head=True)
    models = [
        evaluation.EvalModel("clif", clif),
        evaluation.EvalModel("liif", make_tiny_model("liif", seed=1)),
        evaluation.EvalModel("fixed+bicubic", clif, "fixed"),
    ]
    paths = sorted(image_folder.glob("*.png"))  # long sides 64, 64, 80, 90, 50, 72
    result = evaluation.evaluate_autoencoders(paths, models, [32, 64], tile=24, lpips=l1_per_image, strip_crop=24, progress=False)

    counts = {(r["model"], r["scale"]): r["n"] for r in result["rows"]}
    labels = [m.label for m in models] + ["thumbnail", "input"]  # the floors are always evaluated beside the models
    assert counts == {(label, 32): 6 for label in labels} | {(label, 64): 5 for label in labels}  # the 50x50 image has no 64 ground truth
    assert set(result["settings"]["images"]) == {p.name for p in paths}

    # Recompute one record by hand: the native image resized to long side 64, the render at that size.
    record = next(r for r in result["per_image"] if r["image"] == "img3.png" and r["model"] == "liif" and r["scale"] == 64)
    image = load_image(image_folder / "img3.png")  # 36x90
    z = rendering.encode(models[1].model, image[None])
    render64 = rendering.render(models[1].model, z, (26, 64))
    truth = resize(image[None], (26, 64))
    assert record["size"] == [26, 64]
    assert record["psnr"] == pytest.approx(metrics.psnr(render64, truth).item(), abs=1e-9)
    assert record["ssim"] == pytest.approx(metrics.ssim(render64, truth).item(), abs=1e-9)
    assert record["lpips"] == pytest.approx(l1_per_image(render64, truth).item(), abs=1e-9)
    small = next(r for r in result["per_image"] if r["image"] == "img3.png" and r["model"] == "liif" and r["scale"] == 32)
    direct32 = rendering.render(models[1].model, z, (13, 32))
    assert small["consistency_db"] == pytest.approx(metrics.psnr(resize(render64, (13, 32)), direct32).item(), abs=1e-6)
    assert record["consistency_db"] is None  # the largest scale is the reference
    assert record["colour"] == pytest.approx(metrics.colour_error(render64, truth).item(), abs=1e-9)
    assert record["rim_db"] == pytest.approx(metrics.rim_db(render64, truth).item(), abs=1e-9)
    assert record["zoom_blockiness"] is not None and small["zoom_blockiness"] is None  # the zoom: of the largest scale only

    # The thumbnail floor: the image squashed to the latent's numbers (3x4x4 -> 4x4 RGB), bicubic up.
    floor = next(r for r in result["per_image"] if r["image"] == "img3.png" and r["model"] == "thumbnail" and r["scale"] == 64)
    side = round((np.prod(models[1].model.latent_shape) / 3) ** 0.5)
    up = torch.nn.functional.interpolate(resize(image[None], (side, side)), size=(26, 64), mode="bicubic", align_corners=False)
    assert floor["psnr"] == pytest.approx(metrics.psnr(up.clamp(0, 1), truth).item(), abs=1e-4)  # grid_sample vs interpolate rounding

    assert {g["goal"].split(" ")[0] for g in result["goals"]} == {"clif"}
    assert any("consistency" in g["goal"] for g in result["goals"])

    written = evaluation.write_ae_report(result, tmp_path / "out")
    saved = json.loads(written["json"].read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert "| liif | 64 | 5 |" in written["markdown"].read_text()
    assert Image.open(written["plot"]).size[0] > 400
    strip = Image.open(tmp_path / "out" / saved["strips"][0])
    assert strip.size == (6 * 24 + 5 * 4, 24 + 16)  # ground truth + three models + two floors, 24 px crops


def test_eval_ae_command(ckpt, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_pattern_image(data / "a.png", 40, 56)
    write_pattern_image(data / "gray.png", 48, 48, seed=1, mode="L")  # grayscale files are read as RGB
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    result = invoke("eval-ae", "--data", data, "--model", f"mine={ckpt}", "--model", f"base={ckpt}:fixed", "--scales", "32,48", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "eval-ae.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["mine", "base", "thumbnail", "input"]  # then the two floors
    assert saved["models"][1]["renderer"] == "fixed"
    assert saved["skipped"] == {"broken.png": "unreadable"}
    assert {(r["model"], r["scale"], r["n"]) for r in saved["rows"]} == {(m, s, 2) for m in ("mine", "base", "thumbnail", "input") for s in (32, 48)}
    assert (out / "eval-ae.md").is_file() and len(list((out / "strips").glob("*.png"))) == 2
    assert not list(out.rglob(".*tmp*"))  # nothing half-written left behind


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "nothing to evaluate"),
        (["--model", "nolabel"], "LABEL=PATH"),
        (["--ckpt", "{ckpt}", "--scales", "10"], "at least 32"),
        (["--ckpt", "{tmp}/missing"], "does not exist"),
        (["--ckpt", "{ckpt}", "--holdout"], "none of the held-out files"),
        (["--ckpt", "{plain}", "--renderer", "fixed"], "no 'fixed' renderer"),
        (["--model", "a={ckpt}", "--model", "a={ckpt}:fixed"], "labels must differ"),
        (["--ckpt", "{ckpt}", "--data", "{tmp}/empty"], "contains no images"),
        (["--ckpt", "{ckpt}", "--scales", "512"], "smaller than every scale"),
        (["--ckpt", "{ckpt}", "--lpips-vgg", "{tmp}/vgg.pth"], "does not exist"),
    ],
)
def test_eval_ae_errors(extra, message, ckpt, make_tiny_model, tmp_path):
    plain = tmp_path / "plain"
    make_tiny_model("clif").save_pretrained(plain)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    data = tmp_path / "data"
    data.mkdir()
    write_pattern_image(data / "a.png", 40, 40)
    extra = [e.format(ckpt=ckpt, plain=plain, tmp=tmp_path) for e in extra]
    if "--data" not in extra:
        extra += ["--data", data]
    result = invoke("eval-ae", "--out", tmp_path / "out", "--no-progress", *extra)
    assert result.exit_code == 1
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- eval-gen


def test_patches_are_cut_from_the_image_at_that_scale():
    image = torch.rand(3, 60, 90, generator=torch.Generator().manual_seed(0))
    crops, positions, size = evaluation.scale_patches(image, 40, 16, 5, np.random.default_rng([0, 1, 40]))
    assert size == (40, 60)  # short side 40
    resized = resize(image[None], size)[0]
    assert crops.shape == (5, 3, 16, 16)
    for crop, (top, left) in zip(crops, positions):
        assert torch.equal(crop, resized[:, top : top + 16, left : left + 16])
    again, same_positions, _ = evaluation.scale_patches(image, 40, 16, 5, np.random.default_rng([0, 1, 40]))
    assert same_positions == positions and torch.equal(again, crops)
    assert evaluation.scale_patches(image, 40, 16, 5, np.random.default_rng([1, 1, 40]))[1] != positions
    whole, where, _ = evaluation.scale_patches(torch.rand(3, 50, 50), 32, 32, 5, np.random.default_rng(0))
    assert where == [(0, 0)] and whole.shape == (1, 3, 32, 32)  # a square image at scale = patch: itself


def write_set(folder: Path, noise: float = 0.0, count: int = 5, sizes=((64, 80), (72, 64), (80, 96), (64, 64), (90, 70))):
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i, (h, w) in zip(range(count), sizes):
        write_pattern_image(folder / f"{i}.png", h, w, seed=i)
        if noise:
            pixels = np.asarray(Image.open(folder / f"{i}.png")).astype(np.float64)
            noisy = np.clip(pixels + noise * 255 * rng.standard_normal(pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"{i}.png")
    return sorted(folder.glob("*.png"))


def test_patch_fid_is_zero_for_the_same_set_and_grows_with_noise(tmp_path, one_torch_thread):
    real = write_set(tmp_path / "real")
    sets = {"same": real, "noise 0.02": write_set(tmp_path / "n1", 0.02), "noise 0.1": write_set(tmp_path / "n2", 0.1)}
    result = evaluation.evaluate_generated(sets, real, [32, 56], patch=32, per_image=3, progress=False)
    rows = {(r["samples"], r["scale"]): r for r in result["rows"]}
    for scale in (32, 56):
        assert rows[("same", scale)]["rfid"] == pytest.approx(0.0, abs=1e-6)
        assert rows[("same", scale)]["spectral_db"] == pytest.approx(0.0, abs=1e-9)
        assert 0.0 < rows[("noise 0.02", scale)]["rfid"] < rows[("noise 0.1", scale)]["rfid"]
        assert rows[("noise 0.02", scale)]["spectral_db"] < rows[("noise 0.1", scale)]["spectral_db"]
    assert rows[("same", 56)]["n_real"] == rows[("same", 56)]["n_samples"] == 15  # 3 per image
    assert rows[("same", 32)]["n_real"] == 13  # the 64x64 image at scale 32 is one 32² patch: itself
    written = evaluation.write_gen_report(result, tmp_path / "out")
    assert "| noise 0.1 | 56 (patch) | 15 / 15 |" in written["markdown"].read_text()


@pytest.fixture
def random_inception(tmp_path, monkeypatch):
    """torch-fidelity's InceptionV3 with random weights (He-initialised so features do not vanish), as a file."""
    import safetensors.torch
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = inception.FeatureExtractorInceptionV3("random", ["2048"])
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    path = tmp_path / "inception.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_eval_gen_command_with_inception_weights(tmp_path, random_inception, one_torch_thread):
    write_set(tmp_path / "real", count=3)
    write_set(tmp_path / "noisy", 0.1, count=3)
    out = tmp_path / "out"
    result = invoke(
        "eval-gen", "--samples", tmp_path / "real", "--samples", f"noisy={tmp_path / 'noisy'}", "--real", tmp_path / "real",
        "--patch", "48", "--scales", "56", "--patches-per-image", "2", "--inception", random_inception, "--out", out, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "eval-gen.json").read_text())
    rows = {r["samples"]: r for r in saved["rows"]}
    assert rows["real"]["fid"] == pytest.approx(0.0, abs=1e-6 * max(1.0, rows["noisy"]["fid"]))
    assert rows["noisy"]["fid"] > 0 and rows["noisy"]["rfid"] > 0
    assert rows["real"]["n_real"] == 6
    assert "FID (Inception)" in (out / "eval-gen.md").read_text() and (out / "eval-gen.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--samples", "{tmp}/empty"], "contains no images"),
        (["--samples", "{tmp}/real", "--scales", "32", "--patch", "48"], "at least the patch size"),
        (["--samples", "{tmp}/real", "--inception", "{tmp}/missing.pth"], "does not exist"),
        (["--samples", "{tmp}/real", "--scales", "512"], "no scale has 2 or more patches"),
        (["--samples", "a={tmp}/real", "--samples", "a={tmp}/real"], "two --samples sets"),
    ],
)
def test_eval_gen_errors(extra, message, tmp_path):
    write_set(tmp_path / "real", count=2)
    (tmp_path / "empty").mkdir()
    extra = [e.format(tmp=tmp_path) for e in extra]
    result = invoke("eval-gen", "--real", tmp_path / "real", "--out", tmp_path / "out", "--patch", "32", "--no-progress", *[e for e in extra])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split()), result.output

