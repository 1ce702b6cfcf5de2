import os

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from infd.errors import InfdError
from infd.files import atomic_directory, atomic_path
from infd.images import ImageError, image_size, load_image, pil_to_tensor, resize, save_image, to_uint8_hwc


def noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_noise(path, h=40, w=64, mode="RGB", **save_options):
    Image.fromarray(noise(h, w, 3)).convert(mode).save(path, **save_options)
    return path


def expect_error(match: str, path, call=load_image, **kwargs) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        call(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value


# ---------------------------------------------------------------------------- modes


def test_rgb_png_is_exact(tmp_path):
    pixels = noise(40, 64)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.shape == (3, 40, 64) and image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert image_size(tmp_path / "a.png") == (40, 64)


def test_gray_is_replicated(tmp_path):
    Image.fromarray(noise(40, 64, 1)).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.shape == (3, 40, 64)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


def test_rgba_alpha_over_white(tmp_path):
    Image.new("RGBA", (16, 12), (200, 100, 50, 64)).save(tmp_path / "a.png")
    pixel = load_image(tmp_path / "a.png")[:, 0, 0]
    alpha = 64 / 255
    expected = torch.tensor([200, 100, 50]) / 255 * alpha + (1 - alpha)
    assert torch.allclose(pixel, expected, atol=1e-6)


def test_la_alpha_over_white(tmp_path):
    Image.new("LA", (16, 12), (40, 128)).save(tmp_path / "la.png")
    pixel = load_image(tmp_path / "la.png")[:, 0, 0]
    alpha = 128 / 255
    assert torch.allclose(pixel, torch.full((3,), 40 / 255 * alpha + 1 - alpha), atol=1e-6)


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (16, 12), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.save(tmp_path / "p.png")
    assert torch.allclose(load_image(tmp_path / "p.png")[:, 0, 0], torch.tensor([1.0, 0, 0]))
    image.save(tmp_path / "pt.png", transparency=1)  # colour 1 fully transparent -> white
    assert torch.allclose(load_image(tmp_path / "pt.png")[:, 0, 0], torch.ones(3))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"])
def test_every_pil_mode_gives_rgb_in_unit_range(mode):
    image = pil_to_tensor(Image.new(mode, (10, 9)))
    assert image.shape == (3, 9, 10) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1


def test_integer_and_float_modes_scale():
    assert pil_to_tensor(Image.fromarray(np.full((9, 9), 1000, np.int32), "I"))[0, 0, 0] == pytest.approx(1000 / 65535)
    assert pil_to_tensor(Image.fromarray(np.full((9, 9), 0.25, np.float32), "F"))[0, 0, 0] == 0.25
    assert pil_to_tensor(Image.fromarray(np.full((9, 9), 3.0, np.float32), "F"))[0, 0, 0] == 1.0  # clipped
    cmyk = pil_to_tensor(Image.new("CMYK", (9, 9), (0, 255, 255, 0)))[:, 0, 0]  # no cyan, full M+Y: red
    assert torch.allclose(cmyk, torch.tensor([1.0, 0, 0]))


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp", ".tif"])
def test_other_formats_load(tmp_path, suffix):
    path = write_noise(tmp_path / f"a{suffix}")
    image = load_image(path)
    assert image.shape == (3, 40, 64) and image_size(path) == (40, 64)
    reference = torch.from_numpy(noise(40, 64)).permute(2, 0, 1) / 255
    assert (image - reference).abs().mean() < 0.2  # lossy formats only roughly


def test_16bit_png_keeps_precision(tmp_path):
    Image.fromarray(np.full((12, 16), 1000, np.uint16)).save(tmp_path / "g16.png")
    value = load_image(tmp_path / "g16.png")[0, 0, 0].item()
    assert value == pytest.approx(1000 / 65535, abs=1e-7)
    assert abs(round(1000 / 65535 * 255) / 255 - 1000 / 65535) > 1e-4  # 8 bits could not hold it


def test_16bit_rgb_png_keeps_precision(tmp_path):
    # PIL cannot write 16-bit RGB PNGs, so assemble the chunks by hand (one unfiltered row each).
    import struct
    import zlib

    pixels = np.random.default_rng(0).integers(0, 65536, (10, 12, 3), dtype=np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 12, 10, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    (tmp_path / "rgb16.png").write_bytes(png)
    image = load_image(tmp_path / "rgb16.png")
    assert torch.allclose(image, torch.from_numpy(pixels.astype(np.float32) / 65535).permute(2, 0, 1), atol=1e-7)


def test_16bit_rgb_tiff(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", pixels, photometric="rgb")
    image = load_image(tmp_path / "a.tif")
    assert torch.allclose(image, torch.from_numpy(pixels.astype(np.float32) / 65535).permute(2, 0, 1), atol=1e-7)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(pixels, -1, 0), photometric="rgb", planarconfig="separate")
    assert torch.equal(load_image(tmp_path / "planar.tif"), image)


def test_float_tiff_is_clipped_and_nan_refused(tmp_path):
    values = np.linspace(-0.5, 1.5, 20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3)
    tifffile.imwrite(tmp_path / "f.tif", values, photometric="rgb")
    image = load_image(tmp_path / "f.tif")
    assert image.min() == 0 and image.max() == 1
    values[3, 4, 1] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", values, photometric="rgb")
    expect_error("NaN", tmp_path / "nan.tif")


def test_exif_rotated_jpeg(tmp_path):
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:8, :8] = 255  # a white mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    assert image_size(tmp_path / "r.jpg") == (64, 40)
    image = load_image(tmp_path / "r.jpg")
    assert image.shape == (3, 64, 40)
    assert image[:, :4, -4:].mean() > 0.9 and image[:, :4, :4].mean() < 0.1  # mark now top-right


def test_tiff_orientation_matches_pil(tmp_path):
    pixels = noise(20, 30)
    for orientation in range(1, 9):
        tifffile.imwrite(tmp_path / "o.tif", pixels, photometric="rgb", extratags=[(0x0112, "H", 1, orientation, False)])
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif.tobytes())
        assert image_size(tmp_path / "o.tif") == image_size(tmp_path / "o.png")
        assert torch.equal(load_image(tmp_path / "o.tif"), load_image(tmp_path / "o.png")), orientation


# ---------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    assert expect_error("does not exist", tmp_path / "nope.png").reason == "missing"
    expect_error("does not exist", tmp_path / "nope.png", call=image_size)


def test_garbage_is_not_an_image(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(os.urandom(2000))
    assert expect_error("not a readable image", path, call=image_size).reason == "unreadable"
    expect_error("not a readable image", path)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_file(tmp_path, suffix):
    path = write_noise(tmp_path / f"t{suffix}", 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)  # the header survives; decoding must not
    assert expect_error("truncated or corrupt", path).reason == "corrupt"


def test_tiny_image(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    assert expect_error("smaller than", tmp_path / "tiny.png").reason == "too small"


def test_decompression_bomb(tmp_path):
    path = write_noise(tmp_path / "big.png", 64, 64)
    error = expect_error("decompression bombs", path, max_pixels=1000)
    assert error.reason == "too many pixels" and "1000" in str(error) and "max_pixels" not in str(error)
    expect_error("decompression bombs", path, call=image_size, max_pixels=1000)


# ---------------------------------------------------------------------------- writing


def test_to_uint8_rounds_and_clips():
    image = torch.tensor([-0.5, 0.4 / 255, 0.6 / 255, 1.6 / 255, 2.0]).reshape(1, 1, 5).expand(3, 1, 5)
    out = to_uint8_hwc(image[None])
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 0, 1, 2, 255]
    assert np.array_equal(to_uint8_hwc(image), out)
    with pytest.raises(InfdError):
        to_uint8_hwc(torch.zeros(4, 5, 5))
    with pytest.raises(InfdError, match="NaN"):
        to_uint8_hwc(torch.full((3, 2, 2), float("nan")))


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg", ".webp"])
def test_save_round_trip(tmp_path, suffix):
    x, y = np.meshgrid(np.arange(30) * 8, np.arange(20) * 12, indexing="xy")
    pixels = np.stack([x, y, np.full((20, 30), 90)], -1)
    pixels = pixels.astype(np.uint8)  # smooth, so lossy formats stay close
    save_image(pixels, tmp_path / f"out{suffix}")
    back = to_uint8_hwc(load_image(tmp_path / f"out{suffix}"))
    tolerance = 0 if suffix in (".png", ".tif") else 4
    assert np.abs(back.astype(int) - pixels).mean() <= tolerance
    save_image(torch.from_numpy(pixels).permute(2, 0, 1) / 255, tmp_path / f"t{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"out{suffix}", f"t{suffix}"])


def test_save_unknown_suffix_writes_nothing(tmp_path):
    with pytest.raises(InfdError, match="suffix"):
        save_image(noise(9, 9), tmp_path / "out.gif")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_cleans_up_on_failure(tmp_path, error):
    with pytest.raises(error):
        with atomic_path(tmp_path / "sub" / "out.png") as tmp:
            assert tmp.parent == tmp_path / "sub" and tmp.suffix == ".png" and tmp.name.startswith(".out.tmp-")
            tmp.write_bytes(b"partial")
            raise error()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_replaces(tmp_path):
    (tmp_path / "out.txt").write_text("old")
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("new")
        assert (tmp_path / "out.txt").read_text() == "old"
    assert (tmp_path / "out.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("1")
    assert (target / "config.json").read_text() == "1"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("2")
        assert (target / "config.json").read_text() == "1"  # old one intact until success
    assert (target / "config.json").read_text() == "2"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("3")
            raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ---------------------------------------------------------------------------- resizing


def test_resize_antialias_averages_fine_detail():
    # 48 -> 16: bicubic without antialiasing samples exactly on input pixels (3i + 1), so it aliases.
    checker = ((torch.arange(48)[:, None] + torch.arange(48)[None, :]) % 2).float().expand(3, 48, 48)
    small = resize(checker, (16, 16))
    assert small.shape == (3, 16, 16)
    assert (small - 0.5).abs().max() < 0.02  # antialiased: the checkerboard averages to gray
    aliased = resize(checker, (16, 16), antialias=False)
    assert (aliased - 0.5).abs().min() == 0.5


def test_resize_shapes_constants_and_identity():
    batch = torch.full((2, 5, 3, 20, 30), 0.3)
    out = resize(batch, (7, 11))
    assert out.shape == (2, 5, 3, 7, 11) and torch.allclose(out, torch.full_like(out, 0.3), atol=1e-6)
    image = torch.rand(3, 20, 30)
    assert resize(image, (20, 30)) is image
    assert 0 <= resize(image, (50, 70)).min() and resize(image, (50, 70)).max() <= 1  # bicubic overshoot clamped



def test_atomic_latent_has_ordinary_permissions(tmp_path):
    """safetensors writes 0o600 files; an atomic output gets what the umask gives any new file."""
    from infd.latents import save_latent

    save_latent(tmp_path / "z.safetensors", torch.zeros(1, 3, 4, 4))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "z.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(4, 90), w=st.integers(4, 90), rh=st.integers(1, 120), rw=st.integers(1, 120),
    data=st.data(), seed=st.integers(0, 2**31),
)
def test_resize_window_equals_the_same_pixels_of_the_whole_resize(h, w, rh, rw, data, seed):
    from infd.geometry import Window
    from infd.images import resize_window

    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    top, left = data.draw(st.integers(0, rh - 1)), data.draw(st.integers(0, rw - 1))
    height, width = data.draw(st.integers(1, rh - top)), data.draw(st.integers(1, rw - left))
    expected = resize(image, (rh, rw))[:, top : top + height, left : left + width]
    torch.testing.assert_close(resize_window(image, (rh, rw), Window(top, left, height, width)), expected, atol=2e-5, rtol=0)


def test_a_huge_file_decodes_reduced_for_the_encoder_and_keeps_its_picture(tmp_path):
    """Issue 15 item 7: a 30-Mpx file loaded for a 128² encoder input never becomes a 360 MB float array."""
    import tracemalloc

    h, w = 5000, 6000  # 30 Mpx: above REDUCED_DECODE_PIXELS
    rows = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    pixels = np.stack([np.broadcast_to(rows, (h, w)), np.broadcast_to(cols, (h, w)), np.full((h, w), 90, np.float32)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "huge.png", compress_level=1)
    Image.fromarray(pixels).save(tmp_path / "huge.jpg", quality=95)
    expected = resize(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, (128, 128))
    del pixels
    for name in ("huge.png", "huge.jpg"):
        tracemalloc.start()
        reduced = load_image(tmp_path / name, reduce_to=128)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert 128 <= min(reduced.shape[-2:]) < 256 and abs(reduced.shape[-1] / reduced.shape[-2] - w / h) < 0.02
        assert peak < 50 * 2**20, f"{name}: {peak / 2**20:.0f} MiB traced"
        # What the encoder sees is the same picture (a box reduce, then the antialiased resize).
        assert (resize(reduced[None], (128, 128)) - expected).abs().max() < 0.02
    assert tuple(load_image(tmp_path / "huge.png").shape) == (3, h, w)  # without reduce_to: every pixel
