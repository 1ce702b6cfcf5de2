"""What an evaluation reads: its scales and its images (a folder, the held-out wallpapers)."""

from __future__ import annotations

import os
from pathlib import Path

from infd.data import WALLPAPER_HOLDOUT, list_images
from infd.errors import InfdError
from infd.geometry import Size

MIN_SCALE = 32  # SSIM needs 11 px and LPIPS about 32 px on the short side


def parse_scales(text: str, minimum: int = MIN_SCALE) -> list[int]:
    """"256,512,1024" -> [256, 512, 1024] (sorted, unique); each at least `minimum` pixels."""
    try:
        scales = sorted({int(part) for part in text.replace(" ", "").split(",") if part})
    except ValueError:
        scales = []
    if not scales or scales[0] < minimum:
        raise InfdError(f"scales '{text}' must be comma-separated whole numbers of pixels, each at least {minimum}, e.g. 256,512,1024.")
    return scales


def scaled_size(size: Size, scale: int, side: str = "long") -> Size:
    """(height, width) with the `side` ("long" or "short") equal to `scale`, keeping the aspect ratio."""
    h, w = size
    reference = max(h, w) if side == "long" else min(h, w)
    return max(1, round(h * scale / reference)), max(1, round(w * scale / reference))


def select_images(folder: str | os.PathLike, holdout: bool = False, limit: int | None = None) -> tuple[list[Path], list[str]]:
    """Images of `folder` (sorted), only the held-out split with `holdout`, the first `limit`.

    Returns (paths, names of held-out files missing from the folder).
    """
    if limit is not None and limit <= 0:
        raise InfdError(f"--limit must be at least 1, got {limit}.")
    paths = list_images(folder)
    missing: list[str] = []
    if holdout:
        present = {path.name for path in paths}
        missing = [name for name in WALLPAPER_HOLDOUT if name not in present]
        paths = [path for path in paths if path.name in WALLPAPER_HOLDOUT]
        if not paths:
            raise InfdError(f"--holdout: none of the held-out files ({', '.join(WALLPAPER_HOLDOUT)}) is in {folder}; pass the wallpapers folder or leave out --holdout.")
    return paths[:limit], missing

