"""The machine: the bfloat16 decision on simulated CPUs, the allocator setting, and `infd doctor`'s report."""

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from infd import rendering, system
from infd.cli import app
from infd.commands.doctor import LOCAL_WEIGHTS, doctor_report, report_lines

CPU = torch.device("cpu")


def simulate_cpu(monkeypatch, flags=("avx2", "fma"), mkldnn_bf16=False):
    """This process sees a CPU with `flags` (oneDNN agreeing about bfloat16), and has not warned yet."""
    monkeypatch.setattr(system, "cpu_info", lambda: system.CpuInfo("Simulated CPU", frozenset(flags)))
    monkeypatch.setattr(system, "mkldnn_bf16_supported", lambda: mkldnn_bf16)
    monkeypatch.setattr(rendering, "_warned_slow_bf16", False)


@pytest.mark.filterwarnings("ignore::infd.rendering.PrecisionWarning")
@pytest.mark.parametrize(
    "flags, mkldnn_bf16, fast",
    [
        (("avx2", "fma"), False, False),  # AVX2 only: bfloat16 is emulated
        (("avx2", "avx512f"), False, False),  # AVX-512 without its bfloat16 extension
        (("avx2", "avx512f", "avx512_bf16"), False, True),
        (("avx2", "amx_tile", "amx_bf16"), False, True),
        (("avx2",), True, True),  # oneDNN knows better than the flags we look for
        ((), False, False),  # not Linux: no flags known
    ],
)
def test_bf16_is_fast_only_on_cpus_with_bf16_instructions(monkeypatch, flags, mkldnn_bf16, fast):
    simulate_cpu(monkeypatch, flags, mkldnn_bf16)
    assert system.fast_bf16(CPU) is fast
    assert rendering.effective_dtype(CPU, torch.bfloat16) == (torch.bfloat16 if fast else None)
    assert rendering.render_dtype(CPU, bf16=True) == (torch.bfloat16 if fast else None)
    assert rendering.effective_dtype(CPU, None) is None and rendering.effective_dtype(CPU, torch.float16) == torch.float16


def test_bf16_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert system.fast_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # emulated only
    assert not system.fast_bf16(torch.device("cuda"))
    assert not system.fast_bf16(torch.device("meta"))


def test_bf16_render_on_a_slow_cpu_is_the_float32_render_and_warns_once(monkeypatch, make_tiny_model):
    simulate_cpu(monkeypatch, ("avx2", "fma"))
    model = make_tiny_model()
    z = torch.randn(1, *model.latent_shape)
    fp32 = rendering.render(model, z, (24, 40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = rendering.render(model, z, (24, 40), dtype=torch.bfloat16, tile=16)
        again = rendering.LatentField(model, z, dtype=torch.bfloat16).image((24, 40))
        assert rendering.render_dtype(CPU, bf16=True) is None
    assert torch.equal(first, fp32) and torch.equal(again, fp32)
    precision = [w for w in caught if issubclass(w.category, rendering.PrecisionWarning)]
    assert len(precision) == 1
    shown = warnings.formatwarning(precision[0].message, precision[0].category, precision[0].filename, precision[0].lineno)
    assert shown.count("\n") == 1 and "float32" in shown  # one line on stderr, under the CLI too


def test_bf16_render_on_a_fast_cpu_stays_bf16(monkeypatch, make_tiny_model):
    simulate_cpu(monkeypatch, ("avx2", "avx512f", "avx512_bf16"))
    model = make_tiny_model()
    z = torch.randn(1, *model.latent_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rendering.PrecisionWarning)
        bf16 = rendering.render(model, z, (24, 40), dtype=torch.bfloat16)
    fp32 = rendering.render(model, z, (24, 40))
    assert not torch.equal(bf16, fp32) and (bf16 - fp32).abs().mean() < 0.02


def test_vector_extensions_name_what_the_cpu_has(monkeypatch):
    simulate_cpu(monkeypatch, ("sse2", "fma", "avx512f", "avx2", "amx_bf16"))
    assert system.vector_extensions() == ["avx2", "fma", "avx512f", "amx_bf16"]


def test_cpu_info_reads_this_machine():
    info = system.cpu_info()
    assert info.model and isinstance(info.flags, frozenset)


def test_allocator_tuning_is_idempotent_and_can_be_turned_off(monkeypatch):
    first = system.tune_allocator()  # already done when infd.rendering was imported
    assert first in ("tuned", "not glibc") and system.tune_allocator() == first
    assert system.allocator_description().startswith(first)
    monkeypatch.setenv(system.MALLOC_TUNING_ENV, "0")
    assert system._apply_malloc_tuning() == "off (INFD_MALLOC_TUNING=0)"


def test_doctor_report_has_every_field(tmp_path):
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"")
    report = doctor_report({"lpips_vgg": weights, "clip": tmp_path / "missing"})
    assert set(report["versions"]) == {"infd", "python", "torch", "diffusers", "cuda"}
    assert set(report["cpu"]) == {"model", "cores", "usable_cores", "vector_instructions", "torch_capability", "torch_threads"}
    assert report["os"] and isinstance(report["gpus"], list) and isinstance(report["bf16_fast"]["cpu"], bool)
    assert report["allocator"]
    local = report["local_weights"]
    assert set(local) == {entry.key for entry in LOCAL_WEIGHTS} == {"clip", "lpips_vgg", "inception", "stable_diffusion"}
    assert local["lpips_vgg"]["status"] == "configured" and local["clip"]["status"] == "missing"
    assert local["inception"]["status"] == "not configured" and "--inception" in local["inception"]["set_by"]
    text = "\n".join(report_lines(report))
    for label in ("infd", "python", "torch", "diffusers", "os", "cpu", "vector instructions", "torch threads", "bf16 fast", "allocator", "clip", "inception"):
        assert f"\n{label} " in "\n" + text
    assert ("gpus" in text and "none" in text) if not report["gpus"] else "gpu 0" in text


def test_doctor_command_prints_text_and_json():
    runner = CliRunner()
    text = runner.invoke(app, ["doctor"])
    assert text.exit_code == 0 and "vector instructions" in text.output and "bf16 fast" in text.output
    data = runner.invoke(app, ["doctor", "--json", "--sd", "/nonexistent/sd"])
    assert data.exit_code == 0
    report = json.loads(data.output)
    assert report["local_weights"]["stable_diffusion"] == {**report["local_weights"]["stable_diffusion"], "status": "missing", "path": "/nonexistent/sd"}
