"""Gigapixel exports: Deep Zoom geometry, TIFF/PNG/Deep Zoom outputs equal to a direct render,
memory flat in the output size, nothing left behind by an interrupted export, and `infd render`."""

import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_MODEL
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from infd.cli import app
from infd.geometry import Box
from infd.images import to_uint8_hwc
from infd.latents import save_latent
from infd.rendering import LatentField, render
from infd.viewer import deepzoom
from infd.viewer.deepzoom import DeepZoom, render_tiles

# A renderer this narrow renders 4096² in a few seconds on one core: big exports stay testable.
LIGHT = dict(renderer_hidden=4, renderer_blocks=0)


@pytest.fixture
def light(make_tiny_model, one_torch_thread):
    model = make_tiny_model(**LIGHT)
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    return model, z


def uint8(image: torch.Tensor) -> np.ndarray:
    return to_uint8_hwc(image[0] if image.dim() == 4 else image)


@given(
    height=st.integers(1, 3000),
    width=st.integers(1, 3000),
    tile=st.integers(8, 300),
    overlap=st.integers(0, 4),
)
def test_deep_zoom_tiles_cover_every_level_exactly_once(height, width, tile, overlap):
    zoom = DeepZoom((height, width), tile, overlap)
    assert zoom.level_size(zoom.max_level) == (height, width) and zoom.level_size(0) == (1, 1)
    for level in (0, zoom.max_level // 2, zoom.max_level - 1, zoom.max_level):
        level = max(level, 0)
        h, w = zoom.level_size(level)
        assert (h, w) == (-(-height // 2 ** (zoom.max_level - level)), -(-width // 2 ** (zoom.max_level - level)))
        rows, cols = zoom.tile_counts(level)
        assert not zoom.has_tile(level, cols, 0) and not zoom.has_tile(level, 0, rows) and not zoom.has_tile(level + 1 + zoom.max_level, 0, 0)
        covered_rows, covered_cols = np.zeros(h, int), np.zeros(w, int)
        for row in range(rows):
            win = zoom.tile_window(level, 0, row)
            core = slice(row * tile, min((row + 1) * tile, h))
            covered_rows[core] += 1
            pad = zoom.padded_window(level, 0, row)
            assert pad.top <= win.top and win.top + win.height <= pad.top + pad.height  # the crop lies inside the render
            assert win.top == max(core.start - overlap, 0) and win.top + win.height == min(core.stop + overlap, h)
        for col in range(cols):
            covered_cols[col * tile : min((col + 1) * tile, w)] += 1
        assert (covered_rows == 1).all() and (covered_cols == 1).all()


def test_tiles_equal_a_whole_render_of_their_level(make_tiny_model, one_torch_thread):
    model = make_tiny_model()
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    field = LatentField(model, z)
    zoom = DeepZoom((300, 410), 62, 1)
    # The finest level (far finer than the 32² training size), one below, and a tiny one, in one batched call.
    tiles = [t for t in zoom.all_tiles() if t[0] in (zoom.max_level, zoom.max_level - 1, 3)]
    crops = render_tiles(field, zoom, tiles)
    wholes = {level: render(model, z, zoom.level_size(level))[0] for level in {t[0] for t in tiles}}
    for (level, col, row), crop in zip(tiles, crops, strict=True):
        win = zoom.tile_window(level, col, row)
        expected = wholes[level][:, win.top : win.top + win.height, win.left : win.left + win.width]
        assert crop.shape == expected.shape
        assert (crop - expected).abs().max() <= 1e-5, (level, col, row)


def test_tiff_export_of_4096_squared_reads_back_equal_to_a_direct_render(light, tmp_path):
    model, z = light
    path = tmp_path / "big.tif"
    levels = deepzoom.export_tiff(LatentField(model, z), (4096, 4096), path, progress=False)
    assert levels == [(4096, 4096), (2048, 2048), (1024, 1024), (512, 512)]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        page = tif.pages.first
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [(*size, 3) for size in levels]
        finest, reduced = series.levels[0].asarray(), series.levels[3].asarray()
    assert np.array_equal(finest, uint8(render(model, z, (4096, 4096))))
    # Reduced levels are the field rendered at their own size.
    assert np.array_equal(reduced, uint8(render(model, z, (512, 512))))
    assert [p.name for p in tmp_path.iterdir()] == ["big.tif"]


def test_png_export_streams_to_the_pixels_of_a_direct_render(light, tmp_path):
    model, z = light
    box = Box(-0.5, -1.0, 1.0, 0.25)
    deepzoom.export_png(LatentField(model, z, box), (150, 333), tmp_path / "x.png", tile=64, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), uint8(render(model, z, (150, 333), box=box, tile=64)))


def test_deep_zoom_export_writes_every_tile_of_every_level(light, tmp_path):
    model, z = light
    zoom = deepzoom.export_dzi(LatentField(model, z), (100, 130), tmp_path / "v.dzi", tile_size=30, overlap=1, progress=False)
    descriptor = ET.parse(tmp_path / "v.dzi").getroot()
    size = descriptor.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (descriptor.get("TileSize"), descriptor.get("Overlap"), size.get("Width"), size.get("Height")) == ("30", "1", "130", "100")
    files = sorted(p.relative_to(tmp_path / "v_files").as_posix() for p in (tmp_path / "v_files").rglob("*.png"))
    assert files == sorted(f"{level}/{col}_{row}.png" for level, col, row in zoom.all_tiles())
    whole = uint8(render(model, z, (100, 130)))
    win = zoom.tile_window(zoom.max_level, 2, 1)
    tile = np.asarray(Image.open(tmp_path / "v_files" / str(zoom.max_level) / "2_1.png"))
    assert np.array_equal(tile, whole[win.top : win.top + win.height, win.left : win.left + win.width])


@pytest.mark.parametrize("name", ["out.tif", "out.png", "out.dzi"])
def test_interrupted_exports_leave_nothing_behind(light, tmp_path, monkeypatch, name):
    model, z = light
    field = LatentField(model, z)
    calls = []
    original = LatentField.render

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LatentField, "render", interrupted)
    write = {".tif": deepzoom.export_tiff, ".png": deepzoom.export_png, ".dzi": deepzoom.export_dzi}[name[-4:]]
    out = tmp_path / "exports"
    with pytest.raises(KeyboardInterrupt):
        write(field, (300, 300), out / name, progress=False, **({"tile": 64} if name != "out.dzi" else {"tile_size": 64}))
    assert list(out.iterdir()) == []


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from infd.rendering import LatentField
    from infd.viewer.deepzoom import export_tiff
    from infd.models import NeuralFieldAutoencoder
    torch.manual_seed(0)
    model = NeuralFieldAutoencoder(**json.loads(sys.argv[1])).eval()
    field = LatentField(model, torch.randn(1, *model.latent_shape))
    peaks = []
    for side in (2048, 8192):
        export_tiff(field, (side, side), sys.argv[2], compression="none", progress=False)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(peaks))
    """
)


def test_export_peak_memory_does_not_grow_with_the_output_size(tmp_path):
    config = json.dumps({**TINY_MODEL, **LIGHT})
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, config, str(tmp_path / "m.tif")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    small, big = json.loads(done.stdout.strip().splitlines()[-1])
    # 16x the pixels: an 8192² canvas alone would add 192 MiB to the peak.
    assert big <= 1.2 * small and big - small < 64 * 2**20, (small / 2**20, big / 2**20)


# ---------------------------------------------------------------- infd render


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def ae_and_z(make_tiny_model, tmp_path):
    model = make_tiny_model(**LIGHT)
    model.save_pretrained(tmp_path / "ae")
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(5))
    save_latent(tmp_path / "z.safetensors", z, {"seed": 5})
    return model, z, tmp_path / "ae", tmp_path / "z.safetensors"


def test_render_command_streams_tiff_png_and_deep_zoom(ae_and_z, tmp_path, one_torch_thread):
    model, z, ae, z_file = ae_and_z
    out = tmp_path / "out"
    result = invoke("render", z_file, "--ckpt", ae, "--size", "600x400", "--out", out / "big.tif", "--tile", 256, "--fp32", "--no-progress")
    assert result.exit_code == 0, result.output
    expected = uint8(render(model, z, (400, 600)))
    with tifffile.TiffFile(out / "big.tif") as tif:
        assert tif.pages.first.is_tiled and len(tif.series[0].levels) == 3
        assert np.array_equal(tif.series[0].levels[0].asarray(), expected)
    result = invoke("render", z_file, "--ckpt", ae, "--size", "600x400", "--out", out / "big.png", "--fp32", "--no-progress")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out / "big.png")), expected)
    result = invoke("render", z_file, "--ckpt", ae, "--size", "600x400", "--format", "dzi", "--out", out / "deep", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (out / "deep.dzi").is_file() and (out / "deep_files" / "10" / "2_1.png").is_file()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--format", "gif", "--out", "x.gif"], "unknown export format"),
        (["--format", "dzi", "--out", "x.tif"], "does not match"),
        (["--out", "x.tif", "--tile", 500], "multiple of 16"),
        (["--out", "x.jpg", "--size", "16384x16384"], "larger than"),
        (["--out", "x.tif", "--size", "2000000x10"], "side longer than"),
        (["--out", "x.tif", "--compression", "lzma"], "unknown TIFF compression"),
        (["--out", "x.dzi", "--renderer", "fixed", "--upsample", "lanczos"], "Lanczos"),
    ],
)
def test_bad_export_options_fail_in_one_sentence_and_write_nothing(ae_and_z, tmp_path, options, message):
    _, _, ae, z_file = ae_and_z
    out = tmp_path / "out"
    options = [out / o if isinstance(o, str) and o.startswith("x.") else o for o in options]
    result = invoke("render", z_file, "--ckpt", ae, "--size", "64", *options, "--no-progress")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists() or list(out.iterdir()) == []
