"""Image files in and out, and the one antialiased resize.

Images in memory are float tensors (3, H, W) in [0, 1], already turned upright by their
EXIF/TIFF orientation and with any alpha composited over white. Every problem a user can
hit with a file (missing, not an image, truncated, too small, too large) is an
`ImageError`: one sentence naming the file.
"""

from __future__ import annotations

import errno
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from infd.errors import InfdError, quote_error
from infd.files import atomic_path
from infd.geometry import Box, Size, Window, check_size

MAX_IMAGE_PIXELS = 2**28  # decompression-bomb cap: a header claiming more is refused before decoding
MIN_IMAGE_SIDE = 8
REDUCED_DECODE_PIXELS = 2**24  # above this, a load for a small use (the encoder's input) decodes reduced
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}

_EXIF_ORIENTATION = 0x0112  # the same tag number in EXIF and TIFF
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageError(InfdError):
    """An unusable image file; `reason` is a short category for tallies of skipped files:
    "missing", "unreadable", "too small", "too many pixels" or "corrupt"."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------- reading


def image_size(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Size:
    """(height, width) of the upright image, read from the header only (no decoding)."""
    path = _existing_file(path)
    try:
        (height, width), orientation = _read_header(path)
    except Exception as error:  # decoders raise many types for garbage; all mean the same here
        raise ImageError(f"{path} is not a readable image ({quote_error(error)}).", "unreadable") from error
    if orientation in (5, 6, 7, 8):  # these orientations rotate by 90 degrees
        height, width = width, height
    _check_dimensions(path, (height, width), max_pixels)
    return height, width


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, reduce_to: int | None = None) -> torch.Tensor:
    """Decode an image file to an upright RGB tensor (3, H, W), float32 in [0, 1].

    Memory: the kept image takes 12 bytes a pixel, and decoding a file briefly takes its
    own size again at 3-4 bytes a pixel (8-bit files; 16-bit and float ones 8-16), so a
    2^28-pixel file (the cap) can take about 4 GiB. `reduce_to` (a side in pixels) is for
    uses that need little resolution, like the encoder's input: an 8-bit file of more than
    REDUCED_DECODE_PIXELS is then decoded reduced by the largest whole factor that keeps
    its shorter side at least `reduce_to` (JPEG by DCT scaling, others by a box filter while
    still 8-bit), so only the decode itself scales with the file.
    """
    path = Path(path)
    image_size(path, max_pixels)  # refuse missing, tiny and oversized files before decoding
    try:
        array = _decode(path, reduce_to)
    except InfdError:
        raise
    except Exception as error:  # truncation and corruption surface as many exception types
        raise ImageError(
            f"{path} is truncated or corrupt ({quote_error(error)}); re-download or re-export it.", "corrupt"
        ) from error
    return _to_rgb_tensor(array, path)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An in-memory PIL image of any common mode as (3, H, W) float32 in [0, 1] (no EXIF rotation)."""
    return _to_rgb_tensor(_pil_to_array(image), "the image")


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ImageError(_why_missing(path), "missing")
    if not path.is_file():
        raise ImageError(f"{path} is not a file.", "unreadable")
    return path


def _why_missing(path: Path) -> str:
    """Why `path` cannot be opened: absent, a broken symbolic link, or a loop of links."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path} is a loop of symbolic links; point it at an image."
    if os.path.islink(path):
        return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist."
    return f"{path} does not exist."


def _check_dimensions(path: Path, size: Size, max_pixels: int) -> None:
    height, width = size
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"{path} is {width}x{height} pixels, smaller than the minimum of {MIN_IMAGE_SIDE} pixels a side.",
            "too small",
        )
    if height * width > max_pixels:
        raise ImageError(
            f"{path} has {width}x{height} = {height * width} pixels, more than the cap of {max_pixels} "
            f"that guards against decompression bombs; downscale the file first if you trust it.",
            "too many pixels",
        )


def _magic(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(32)


def _is_tiff(path: Path) -> bool:
    return _magic(path)[:4] in _TIFF_MAGIC


def _is_16bit_colour_png(path: Path) -> bool:
    """PIL reduces 16-bit RGB(A) and gray+alpha PNGs to 8 bits; these go to torchvision instead."""
    head = _magic(path)
    bit_depth, colour_type = head[24:25], head[25:26]
    return head.startswith(_PNG_MAGIC) and bit_depth == b"\x10" and colour_type in (b"\x02", b"\x04", b"\x06")


def _read_header(path: Path) -> tuple[Size, int]:
    """((height, width) as stored, orientation 1..8)."""
    if _is_tiff(path):
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                return (int(page.imagelength), int(page.imagewidth)), _tiff_orientation(page)
        except Exception:
            pass  # PIL reads some TIFF variants tifffile rejects
    with _open_pil(path) as image:
        width, height = image.size
        return (height, width), _pil_orientation(image)


_PIL_CAP_LOCK = threading.Lock()


@contextmanager
def _open_pil(path: Path) -> Iterator[Image.Image]:
    """Image.open under our own cap: callers check `max_pixels` against the header themselves.

    PIL refuses images above 2 * Image.MAX_IMAGE_PIXELS (about 179 Mpx), below our cap;
    for those rare files its global limit is lifted for the duration of one open.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:
            with _PIL_CAP_LOCK:
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    image = Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    with image:
        yield image


def _pil_orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        # PIL would decode the whole PNG looking for an eXIf chunk after the pixel data;
        # such late chunks are rare, and the header read must stay cheap.
        return 1
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def _tiff_orientation(page: tifffile.TiffPage) -> int:
    orientation = page.tags.valueof(_EXIF_ORIENTATION, 1)
    return int(orientation) if orientation in range(1, 9) else 1


def _decode(path: Path, reduce_to: int | None = None) -> np.ndarray:
    """Upright pixels (H, W, C) in [0, 1] (float, unclipped for float files), C in 1..4."""
    if _is_tiff(path):
        try:
            return _decode_tiff(path)
        except Exception:
            pass  # e.g. LZW or JPEG-in-TIFF without imagecodecs: PIL's libtiff may manage
    if _is_16bit_colour_png(path):
        return _decode_png16(path)
    with _open_pil(path) as image:
        if reduce_to is not None and image.width * image.height > REDUCED_DECODE_PIXELS:
            orientation = _pil_orientation(image)
            return _orient(_pil_to_array(_reduced(image, reduce_to)), orientation)
        return _pil_to_array(ImageOps.exif_transpose(image))


def _reduced(image: Image.Image, side: int) -> Image.Image:
    """`image` shrunk by the largest whole factor that keeps its shorter side >= `side`, before
    any float conversion: JPEG decodes at 1/2, 1/4 or 1/8 (draft), the rest are box-reduced.
    Modes whose meaning a box filter would change (palettes, colour keys) stay as they are."""
    factor = min(image.size) // side
    if factor < 2 or image.mode not in ("L", "LA", "RGB", "RGBA") or "transparency" in image.info:
        return image
    if image.format == "JPEG":
        image.draft(image.mode, (image.width // factor, image.height // factor))
        factor = min(image.size) // side
    return image.reduce(factor) if factor >= 2 else image


def _decode_png16(path: Path) -> np.ndarray:
    import torchvision.io  # lpips depends on torchvision; imported lazily because it is slow

    data = torchvision.io.read_file(str(path))
    pixels = torchvision.io.decode_png(data, mode=torchvision.io.ImageReadMode.UNCHANGED)  # (C, H, W) uint16
    array = pixels.permute(1, 2, 0).numpy().astype(np.float32) / 65535
    with _open_pil(path) as image:
        return _orient(array, _pil_orientation(image))


def _decode_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        array = _samples_last(page.asarray(), page.axes)
        photometric = tifffile.PHOTOMETRIC(page.photometric)
        associated_alpha = bool(page.extrasamples) and page.extrasamples[0] == tifffile.EXTRASAMPLE.ASSOCALPHA
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            array = page.colormap.T[array[..., 0]].astype(np.float32) / 65535  # colormap: (3, 2**bits) uint16
        else:
            array = _to_unit_range(array)
        orientation = _tiff_orientation(page)
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        array = np.concatenate([1 - array[..., :1], array[..., 1:]], axis=-1)  # invert gray, keep alpha
    elif photometric == tifffile.PHOTOMETRIC.SEPARATED and array.shape[-1] >= 4:
        cmy, k = array[..., :3], array[..., 3:4]
        array = (1 - cmy) * (1 - k)
    elif photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.PALETTE):
        raise ValueError(f"TIFF colour space {photometric.name} is not handled by the tifffile path")
    if associated_alpha and array.shape[-1] in (2, 4):
        array = _unpremultiply(array)
    return _orient(array, orientation)


def _unpremultiply(array: np.ndarray) -> np.ndarray:
    """Premultiplied (H, W, C + alpha) to straight alpha, so compositing treats every file alike."""
    color, alpha = array[..., :-1], array[..., -1:]
    straight = np.divide(color, alpha, out=np.ones_like(color), where=alpha > 0)
    return np.concatenate([straight, alpha], axis=-1)


def _samples_last(array: np.ndarray, axes: str) -> np.ndarray:
    """A TIFF page as (H, W, C) whatever its planar configuration."""
    if "S" not in axes:
        array, axes = array[..., None], axes + "S"
    array = np.moveaxis(array, axes.index("S"), -1)
    axes = axes.replace("S", "") + "S"
    extra = tuple(i for i, axis in enumerate(axes) if axis not in "YXS")
    if any(array.shape[i] != 1 for i in extra):
        raise ValueError(f"TIFF page has axes {axes}; only 2-D images are supported")
    return array.reshape(array.shape[-3:]) if extra else array


def _to_unit_range(array: np.ndarray) -> np.ndarray:
    """Integers scaled by their type's maximum; floats kept as they are (clipped later)."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float64 if array.dtype.itemsize > 2 else np.float32) / np.iinfo(array.dtype).max
    return array.astype(np.float32)


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to (H, W, C) pixels, as PIL.ImageOps.exif_transpose does."""
    transposed = array.swapaxes(0, 1)
    upright = {
        1: array,
        2: array[:, ::-1],
        3: array[::-1, ::-1],
        4: array[::-1],
        5: transposed,
        6: transposed[:, ::-1],  # rotate 90 degrees clockwise
        7: transposed[::-1, ::-1],
        8: transposed[::-1],  # rotate 90 degrees counter-clockwise
    }[orientation]
    return np.ascontiguousarray(upright)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL pixels as (H, W, C) in [0, 1], C in 1..4, keeping 16-bit and float precision."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.float32)[..., None] / 65535
    if mode == "I":  # 32-bit integer mode; PIL uses it for 16-bit gray PNGs in some versions
        return np.asarray(image).astype(np.float64)[..., None] / 65535
    if mode == "F":
        return np.asarray(image, dtype=np.float32)[..., None]
    if mode == "1":
        return np.asarray(image, dtype=np.float32)[..., None]
    if "transparency" in image.info and mode in ("L", "RGB", "P"):
        image = image.convert("RGBA")  # a transparent colour key becomes a real alpha channel
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # P, PA, CMYK, YCbCr, LAB, HSV, RGBa, ...
        image = image.convert("RGBA" if "A" in mode.upper() else "RGB")
    array = np.asarray(image, dtype=np.float32) / 255
    return array[..., None] if array.ndim == 2 else array


def _to_rgb_tensor(array: np.ndarray, path: str | os.PathLike) -> torch.Tensor:
    """(H, W, C) with C = gray, gray+alpha, RGB or RGBA -> (3, H, W) float32 over white."""
    if not np.isfinite(array).all():
        raise ImageError(f"{path} contains NaN or infinite pixel values.", "corrupt")
    array = np.clip(array, 0, 1)
    channels = array.shape[-1]
    color, alpha = (array[..., :-1], array[..., -1:]) if channels in (2, 4) else (array, None)
    if alpha is not None:
        color = color * alpha + (1 - alpha)
    if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
    if color.shape[-1] != 3:
        raise ImageError(f"{path} has {channels} channels; expected gray, RGB, with or without alpha.", "unreadable")
    return torch.from_numpy(np.ascontiguousarray(color, dtype=np.float32)).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------- writing


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded and clipped."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise InfdError(f"expected an image tensor of shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}.")
    image = image.detach().float()
    if not torch.isfinite(image).all():
        raise InfdError("the image to save contains NaN or infinite values.")
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def save_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Write a float tensor (3, H, W) in [0, 1] or uint8 array (H, W, 3); format from the suffix.

    The file appears complete or not at all (atomic rename).
    """
    path = Path(path)
    image_format = SAVE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise InfdError(f"cannot save {path}: use one of the suffixes {', '.join(SAVE_FORMATS)}.")
    pixels = _as_uint8_hwc(image)
    with atomic_path(path) as tmp:
        if image_format == "TIFF":
            tifffile.imwrite(tmp, pixels, photometric="rgb")
        else:
            options = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}
            Image.fromarray(pixels).save(tmp, format=image_format, **options)


def _as_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return to_uint8_hwc(image)
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3):
        raise InfdError("save_image takes a float tensor (3, H, W) in [0, 1] or a uint8 array (H, W, 3).")
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------------------- resizing


def resize(image: torch.Tensor, size: Size, antialias: bool = True) -> torch.Tensor:
    """Bicubic resize of (..., 3, H, W) in [0, 1] to (..., 3, h, w), clamped to [0, 1].

    Antialiased by default, so downsampling averages the pixels it drops instead of
    aliasing. Returns `image` itself when it already has `size`.
    """
    h, w = check_size(size, "resize size")
    if tuple(image.shape[-2:]) == (h, w):
        return image
    leading = image.shape[:-3]
    batch = image.reshape(-1, *image.shape[-3:])
    resized = F.interpolate(batch, size=(h, w), mode="bicubic", antialias=antialias, align_corners=False)
    return resized.clamp(0, 1).reshape(*leading, image.shape[-3], h, w)



def lanczos_resize(image: torch.Tensor, size: Size, box: Box | None = None) -> torch.Tensor:
    """PIL's Lanczos resize of `box` (default: all) of (B, 3, H, W) in [0, 1] to (B, 3, h, w).

    As the paper's code prepares its inputs: 8-bit images (every value a multiple of 1/255)
    are resized as 8-bit RGB, exactly as PIL resizes a decoded file (the result is rounded to
    8 bits); others per channel in float, nothing quantised (the Lanczos-upsampled baseline).
    """
    h, w = check_size(size, "resize size")
    top, left, bottom, right = (box or Box.full()).to_pixels(tuple(image.shape[-2:]))
    region = (left, top, right, bottom)  # PIL's order
    out = torch.empty(image.shape[0], 3, h, w)
    for i, one in enumerate(image.float().cpu()):
        levels = one * 255
        if torch.equal(levels, levels.round()):
            pil = Image.fromarray(levels.round().to(torch.uint8).permute(1, 2, 0).numpy(), mode="RGB")
            out[i] = pil_to_tensor(pil.resize((w, h), Image.Resampling.LANCZOS, box=region))
            continue
        for c in range(3):
            channel = Image.fromarray(one[c].numpy(), mode="F").resize((w, h), Image.Resampling.LANCZOS, box=region)
            out[i, c] = torch.from_numpy(np.array(channel))
    return out.clamp(0, 1)


def resize_window(image: torch.Tensor, size: Size, window: Window) -> torch.Tensor:
    """`window` of `resize(image, size)`, (3, H, W) -> (3, window.height, window.width),
    computing only those pixels. `image` is float in [0, 1] or uint8.

    Antialiased bicubic downsampling is separable: output rows are fixed mixtures of input
    rows, likewise columns. The window's rows of that matrix (and its columns') are built
    as in torch's antialiased kernel and applied to the input band they touch, so a small
    crop of a large image costs a small fraction of the whole resize and equals its
    pixels (to float32 rounding, ~1e-6). Upsampling falls back to `resize`, then crops.
    """
    h, w = check_size(size, "resize size")
    rows = slice(window.top, window.top + window.height)
    cols = slice(window.left, window.left + window.width)
    if (h, w) == tuple(image.shape[-2:]):
        return unit_float(image[..., rows, cols])
    if h > image.shape[-2] or w > image.shape[-1]:
        return resize(unit_float(image), (h, w))[..., rows, cols]
    wy, y0, y1 = _antialiased_bicubic_rows(image.shape[-2], h, window.top, window.height)
    wx, x0, x1 = _antialiased_bicubic_rows(image.shape[-1], w, window.left, window.width)
    return (wy @ unit_float(image[..., y0:y1, x0:x1]) @ wx.T).clamp(0, 1)


def unit_float(image: torch.Tensor) -> torch.Tensor:
    """An image as float32 in [0, 1]: uint8 (0..255, a compact in-memory copy) is scaled."""
    return image.float() / 255 if image.dtype == torch.uint8 else image.float()


def _antialiased_bicubic_rows(n_in: int, n_out: int, first: int, count: int) -> tuple[torch.Tensor, int, int]:
    """Rows first .. first + count - 1 of the (n_out, n_in) antialiased bicubic resampling
    matrix (n_in >= n_out), restricted to the input span [start, stop) they touch.

    Mirrors torch's antialiased bicubic (as Pillow's): the kernel (a = -0.5) is stretched
    by the scale n_in / n_out, output pixel i is centred at scale * (i + 0.5) in input
    pixel units, and its weights are normalised to sum to 1.
    """
    scale = n_in / n_out
    support = 2.0 * scale
    centers = scale * (np.arange(first, first + count) + 0.5)
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), n_in)
    start, stop = int(lo.min()), int(hi.max())
    taps = np.arange(start, stop)
    weights = _bicubic_kernel((taps[None, :] - centers[:, None] + 0.5) / scale)
    weights[(taps[None, :] < lo[:, None]) | (taps[None, :] >= hi[:, None])] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return torch.from_numpy(weights.astype(np.float32)), start, stop


def _bicubic_kernel(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))
