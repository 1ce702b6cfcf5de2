"""Zoom videos: from the whole image into a box at constant zoom speed, every frame rendered from the field.

    boxes = zoom_path(Box.full(), Box(-0.1, 0.2, 0.05, 0.4), frames=120, aspect=4 / 3, video_size=(1080, 1440))
    write_zoom_video(LatentField(model, z), boxes, (1080, 1440), "zoom.mp4", fps=30, progress=True)

A frame is not cropped from one big render: each is the field rendered at the video's
resolution over that frame's box (phi decoded once, by `LatentField`), so the last frame
of a 1000x zoom is as sharp as the first. The box shrinks geometrically (constant zoom
speed in log scale) about the one point that stays put on the screen, so the path is a
straight, uniform glide with no swerve at either end.

MP4 is H.264 through imageio-ffmpeg, which ships its own ffmpeg (nothing to install on
the system); GIF and WebP, chosen by the suffix, are written by Pillow. Every output is
written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from infd import geometry
from infd.errors import InfdError
from infd.files import atomic_path
from infd.geometry import Box, Size
from infd.images import to_uint8_hwc
from infd.rendering import DEFAULT_TILE, LatentField

VIDEO_FORMATS = (".mp4", ".gif", ".webp")
MAX_FRAMES = 10_000
MAX_ZOOM = 65536.0  # the viewer's virtual image is 65536 px wide: as deep as anything else in infd zooms
MAX_VIDEO_SIDE = 8192
MAX_ANIMATION_BYTES = 2 * 2**30  # GIF and WebP hold every frame in memory while Pillow writes them
MP4_OPTIONS = ["-crf", "18", "-preset", "medium", "-movflags", "+faststart"]  # near-lossless, plays while downloading


# ---------------------------------------------------------------- the path


def frame_box(box: Box, aspect: float, video_size: Size) -> Box:
    """The smallest box of the video's shape around `box` (same centre), in an image of `aspect` (width / height).

    A box of image units shows undistorted at H x W when its width in the image's pixels
    over its height is W / H, so the box grows along its short direction to that shape.
    """
    h, w = video_size
    shape = (w / h) / aspect  # the box's width / height, in image units, that H x W shows undistorted
    height, width = max(box.height, box.width / shape), max(box.width, box.height * shape)
    cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
    return Box(cy - height / 2, cx - width / 2, cy + height / 2, cx + width / 2)


def zoom_path(start: Box, end: Box, frames: int, aspect: float, video_size: Size) -> list[Box]:
    """`frames` boxes from `start` to `end` (each made the video's shape) at constant zoom speed.

    The box side is s0 * r^t (r = s1 / s0, t from 0 to 1 in equal steps), and the box is
    scaled about the fixed point p of the similarity that maps the first box onto the last:
    centre(t) = p + (c0 - p) * r^t. On the screen p stays put and every other point moves
    at a constant speed, so the zoom neither speeds up nor swerves.
    """
    first, last = frame_box(start, aspect, video_size), frame_box(end, aspect, video_size)
    ratio = last.height / first.height
    c0 = np.array([(first.y0 + first.y1) / 2, (first.x0 + first.x1) / 2])
    c1 = np.array([(last.y0 + last.y1) / 2, (last.x0 + last.x1) / 2])
    fixed = (c1 - ratio * c0) / (1 - ratio) if abs(1 - ratio) > 1e-9 else None
    boxes = []
    for i in range(frames):
        t = i / (frames - 1)
        scale = ratio**t
        centre = fixed + (c0 - fixed) * scale if fixed is not None else c0 + t * (c1 - c0)  # no zoom: a straight pan
        half = np.array([first.height, first.width]) * scale / 2
        boxes.append(Box(*(centre - half), *(centre + half)))
    return boxes


# ---------------------------------------------------------------- checks


def check_video_options(out: str | os.PathLike, box: Box, frames: int, fps: float) -> str:
    """The video's format (its suffix), refusing before any work a box, frame count or frame rate it cannot be made with."""
    suffix = Path(out).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise InfdError(f"output '{out}' must end in one of {', '.join(VIDEO_FORMATS)} (MP4 is H.264; GIF and WebP are for short clips).")
    geometry.check_inside_image(box, "the zoom's box")
    zoom = 2 / max(box.height, box.width)
    if zoom > MAX_ZOOM:
        raise InfdError(f"the box {box.as_tuple()} is a {zoom:.0f}x zoom, more than the {MAX_ZOOM:.0f}x a video may zoom; choose a larger box.")
    if isinstance(frames, bool) or not 2 <= frames <= MAX_FRAMES:
        raise InfdError(f"--frames must be from 2 to {MAX_FRAMES}, got {frames}.")
    if not (math.isfinite(fps) and 1 <= fps <= 120):
        raise InfdError(f"--fps must be from 1 to 120, got {fps}.")
    return suffix


def video_size(request: Size | int, aspect: float, suffix: str) -> Size:
    """The frame size (H, W) of a --size request for the whole image of `aspect`, checked for the format.

    H.264 in the usual yuv420p needs even sides: a short side that the long-side rule
    makes odd is rounded down to even; an odd side the user typed is refused.
    """
    h, w = geometry.fit_size(request, aspect)
    if max(h, w) > MAX_VIDEO_SIDE:
        raise InfdError(f"{w}x{h} has a side longer than the {MAX_VIDEO_SIDE} pixels a video frame may have; choose a smaller --size.")
    if suffix == ".mp4":
        if isinstance(request, int):  # only the short side, which the rule derived, moves
            h, w = (side if side == request else max(2, side - side % 2) for side in (h, w))
        if h % 2 or w % 2 or min(h, w) < 2:
            raise InfdError(f"an H.264 video needs even sides of at least 2 pixels, got {w}x{h}; choose an even --size.")
    return h, w


def check_animation_memory(suffix: str, frames: int, size: Size) -> None:
    """Refuse a GIF or WebP whose frames would not fit in memory (Pillow writes them all at once)."""
    h, w = size
    need = frames * h * w * 3
    if suffix != ".mp4" and need > MAX_ANIMATION_BYTES:
        raise InfdError(f"a {suffix[1:].upper()} of {frames} frames at {w}x{h} would hold {need / 2**30:.1f} GiB in memory; write an .mp4, or use fewer --frames or a smaller --size.")


# ---------------------------------------------------------------- rendering and writing


def render_frames(field: LatentField, boxes: list[Box], size: Size, tile: int = DEFAULT_TILE, progress: bool = False) -> Iterator[np.ndarray]:
    """Each box rendered from the field at `size`, as (H, W, 3) uint8, one frame at a time."""
    for box in tqdm(boxes, desc="zoom video", unit="frame", disable=not progress, dynamic_ncols=True):
        yield to_uint8_hwc(field.image(size, tile, box=box)[0])


def write_video(frames: Iterable[np.ndarray], size: Size, out: str | os.PathLike, fps: float = 30) -> None:
    """Write (H, W, 3) uint8 frames as MP4 (H.264), GIF or WebP by the suffix of `out`, atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    with atomic_path(out) as tmp:
        if suffix == ".mp4":
            _write_mp4(frames, size, tmp, fps)
        else:
            images = [Image.fromarray(frame) for frame in frames]
            options = {"quality": 90} if suffix == ".webp" else {}
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **options)


def _write_mp4(frames: Iterable[np.ndarray], size: Size, path: Path, fps: float) -> None:
    import imageio_ffmpeg

    h, w = size
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None, macro_block_size=1, ffmpeg_log_level="error", output_params=MP4_OPTIONS
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()  # ffmpeg finishes the file (or, after an error, stops; the temporary is then removed)


def write_zoom_video(
    field: LatentField, boxes: list[Box], size: Size, out: str | os.PathLike, fps: float = 30, tile: int = DEFAULT_TILE, progress: bool = False
) -> None:
    """Render every box of `boxes` from `field` at `size` and write the frames to `out` (.mp4, .gif or .webp)."""
    check_animation_memory(Path(out).suffix.lower(), len(boxes), size)
    write_video(render_frames(field, boxes, size, tile, progress), size, out, fps)
