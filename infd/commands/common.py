"""What every `infd` command shares: one-sentence errors, verbatim messages, option help.

Every command reports a user error as one sentence on stderr and exits with status 1;
outputs are written to a temporary name and renamed, so a failed command leaves nothing.
Messages print paths and user text verbatim (`report`): nothing in them is Rich markup.
"""

from __future__ import annotations

import functools
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from infd.errors import InfdError

console = Console(stderr=True)

SIZE_HELP = "Output size as WIDTHxHEIGHT (exact, e.g. 2048x1536) or one number for the long side, the short side following the aspect of what is rendered (e.g. 2048: 2048x1536 for a 4:3 photo)."
BOX_HELP = (
    "Region to render as y0,x0,y1,x1 (top-left to bottom-right) in image units: the image spans [-1, 1], "
    "and beyond it, up to ±8, the field extends its border; default: the whole image."
)
PRECISION_DEFAULT = (
    "float32 (--bf16 renders 2048² 2.8x faster on CPUs with bfloat16 instructions and on GPUs, 0.05 dB lower PSNR; "
    "elsewhere it falls back to float32 with a warning, see `infd doctor`)"
)
PRECISION_HELP = f"Render in bfloat16 (autocast) or float32. Default: {PRECISION_DEFAULT}."
RENDERER_HELP = "clif (default: the autoencoder's own renderer) or fixed: the fixed-resolution baseline head, upsampled."
UPSAMPLE_HELP = "How --renderer fixed upsamples: bicubic (tiled) or lanczos (PIL, whole image)."
TIME_LIMIT_HELP = "Stop after this many minutes, at a step boundary, with a checkpoint (resume with --resume)."


def check_image_suffix(out: Path) -> None:
    """Refuse, before any work, an image output whose suffix we cannot write."""
    from infd.images import SAVE_FORMATS

    if out.suffix.lower() not in tuple(SAVE_FORMATS):
        raise InfdError(f"output '{out}' must end in one of {', '.join(tuple(SAVE_FORMATS))}.")


def check_output_pixels(height: int, width: int) -> None:
    """Refuse an output image of more pixels than one in-memory image may have (`rendering.MAX_RENDER_PIXELS`)."""
    from infd.rendering import MAX_RENDER_PIXELS

    if height * width > MAX_RENDER_PIXELS:
        raise InfdError(f"{width}x{height} is larger than the {MAX_RENDER_PIXELS} pixels one output image may have; render a --box of it or a smaller --size.")


def report(label: str, message: str, style: str = "green") -> None:
    """One line on stderr: `label` in `style`, then `message` verbatim (paths and user text are never markup)."""
    console.print(Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True)


def reports_errors(command):
    """Turn InfdError into one line on stderr and exit status 1, and Ctrl-C or SIGTERM into status 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except InfdError as error:
            report("error:", str(error), "bold red")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            report("interrupted:", "nothing was left half-written.", "bold red")
            raise typer.Exit(130) from None

    return wrapper


@contextmanager
def sigterm_as_interrupt():
    """Handle SIGTERM (`kill`, `timeout`, job schedulers) like Ctrl-C, so atomic writers remove their temporaries."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
