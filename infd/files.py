"""Atomic outputs: a file or folder appears complete under its final name, or not at all.

Every writer in infd (images, checkpoints, benchmark results) writes into a temporary
sibling and renames it into place, so an interrupted run never leaves a half-written
output that a later run would trust.

Replacing is safe for what a command wrote itself, never for what a user keeps there:
`check_replaceable` is the one rule a command applies to its folder outputs (an
`infd invert` folder, a Deep Zoom export) before any work. An existing output is
replaced only with --overwrite and only when everything in it is what the command
writes (its `Layout`); an empty folder holds nothing to lose and is always replaced.
A single-file output (an image, a latent) replaces an earlier file of that name.

Temporaries are named `.NAME.tmp-PID-RANDOM[.suffix]` after the process writing them. A
writer killed outright (kill -9, power loss) cannot remove its own; the next atomic write
in that folder does (`clear_stale_temporaries`), but only those whose writer process has
ended and that have not changed for a minute, so concurrent writers never meet.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from infd.errors import InfdError, quote_error

# What a command writes in a folder output: entry-name regex -> None for a file, or the
# Layout of a sub-folder. Anything else found there is the user's, not the command's.
Layout = dict[str, "Layout | None"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file next to `path`; on success it replaces `path`.

    The temporary name keeps the suffix (`.out.tmp-4242-1a2b3c4d.png` for `out.png`) so
    writers that pick the format from the suffix still work. On any exception,
    KeyboardInterrupt included, the temporary file is deleted and the error re-raised.
    """
    path = Path(path)
    # Creating the file with O_EXCL reserves the name; mode 0o666 lets the umask decide
    # the final permissions, as for a file opened normally (mkstemp would force 0o600).
    tmp = _reserve_temporary(path, f".{path.stem}.tmp-", path.suffix, _create_file)
    try:
        with disk_errors(path):
            yield tmp
            # Some writers replace the file they are given (safetensors writes 0o600): restore
            # the permissions a normally opened file gets.
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`.

    Used for checkpoints (config.json + *.safetensors). An existing `path` is renamed
    aside before the new folder is renamed in, and removed only afterwards, so at every
    moment either the old or the new folder is complete. On failure the temporary
    folder is removed and `path` is left untouched.
    """
    path = Path(path)
    tmp = _reserve_temporary(path, f".{path.name}.tmp-", "", _create_directory, folder=True)
    try:
        with disk_errors(path):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with disk_errors(path):
        _swap_into_place(tmp, path)


def _reserve_temporary(path: Path, prefix: str, suffix: str, create: Callable[[Path], None], folder: bool = False) -> Path:
    """Create path's folder and a temporary sibling, saying in one sentence why not when it cannot be."""
    check_output_path(path, folder)
    try:
        _prepare_folder(path.parent)
        return _unique_sibling(path, prefix, suffix, create)
    except OSError as error:
        raise InfdError(f"cannot write '{path}': {quote_error(error)}; choose another --out.") from None


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Say in one sentence that the disk filled up, or refused, while writing `path`."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InfdError(f"the disk filled up while writing '{path}'; nothing was left behind: free some space or write a smaller output.") from None
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InfdError(f"cannot write '{path}': {quote_error(error)}; choose another --out.") from None
        raise


def check_output_path(path: str | os.PathLike, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a folder where a file goes (or a file where
    a folder goes, for `folder`), a file among its parents, or a parent folder we may not write in."""
    path = Path(path)
    if os.path.isdir(path) and not folder:
        raise InfdError(f"'{path}' is a folder; --out names the file to write, e.g. '{path / ('out' + (path.suffix or '.png'))}'.")
    if folder and os.path.lexists(path) and not os.path.isdir(path):
        raise InfdError(f"'{path}' is a file; --out names a folder to write into, so choose another --out.")
    parent = _nearest_existing(path.parent)
    if not os.path.isdir(parent):
        raise InfdError(f"cannot write '{path}': '{parent}' is a file, not a folder; choose another --out.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InfdError(f"cannot write '{path}': the folder '{parent}' is not writable; choose another --out.")


def _nearest_existing(path: Path) -> Path:
    """`path` or the closest of its parents that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _swap_into_place(new: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    old = _unique_sibling(path, f".{path.name}.old-", "", lambda _: None)
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)  # put the previous version back rather than leave nothing
        shutil.rmtree(new, ignore_errors=True)
        raise
    _remove(old)


def _unique_sibling(path: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new name `prefix + random + suffix` in path's folder, reserved by `create`."""
    for _ in range(100):
        candidate = path.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        if os.path.lexists(candidate):
            continue
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not find a free temporary name next to {path}")


# ---------------------------------------------------------------- temporaries of killed writers

# `.NAME.tmp-PID-RANDOM` with an optional suffix: the names `_unique_sibling` gives temporaries.
_TEMPORARY = re.compile(r"\..+\.tmp-(\d+)-[0-9a-f]{8}(\.[^.]+)?")
STALE_AFTER_S = 60.0
_cleared: set[Path] = set()


def _prepare_folder(folder: Path) -> None:
    """Create `folder` if needed and, once per process, clear what killed writers left there."""
    folder.mkdir(parents=True, exist_ok=True)
    if folder not in _cleared:
        _cleared.add(folder)
        clear_stale_temporaries(folder)


def clear_stale_temporaries(folder: Path) -> None:
    """Remove temporaries of our naming in `folder` whose writer has ended and that are over a minute old."""
    now = time.time()
    for entry in os.scandir(folder):
        match = _TEMPORARY.fullmatch(entry.name)
        if match and not _process_alive(int(match[1])) and now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
            _remove(Path(entry.path))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a PID we can ask about: keep its files
    return True


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def _create_directory(path: Path) -> None:
    os.mkdir(path, 0o777)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- replacing earlier outputs


def check_replaceable(path: str | os.PathLike, layout: Layout | None, overwrite: bool, command: str) -> None:
    """Refuse, in one sentence, to write `path` over something that exists, unless `overwrite` is
    given and it is `command`'s own earlier output: a file for `layout` None, else a folder of `layout`."""
    path = Path(path)
    if not os.path.lexists(path) or (layout is not None and _is_empty_folder(path)):
        return
    if not overwrite:
        raise InfdError(f"'{path}' already exists; pass --overwrite to replace an earlier `{command}` output there, or choose another --out.")
    foreign = _foreign_entry(path, layout)
    if foreign is not None:
        raise InfdError(f"--overwrite replaces only what `{command}` writes, and '{foreign}' is not that; move it away or choose another --out.")


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _foreign_entry(path: Path, layout: Layout | None) -> Path | None:
    """The first of `path` and the entries under it that `layout` does not describe; None when it describes all."""
    if path.is_symlink() or path.is_dir() != (layout is not None):
        return path
    for entry in sorted(path.iterdir()) if layout is not None else ():
        pattern = next((p for p in layout if re.fullmatch(p, entry.name)), None)
        found = entry if pattern is None else _foreign_entry(entry, layout[pattern])
        if found is not None:
            return found
    return None
