"""The tile service behind `infd serve`: latents by id, phi decoded once per latent, tiles batched.

    book = LatentBook(pipe=pipe)                       # or LatentBook() with latents added by hand
    with TileService(model, book) as service:
        png = service.tile("seed-7", level=12, col=3, row=5).result()     # bytes
        view = service.view("seed-7", Box(-0.5, -0.5, 0.5, 0.5), (768, 1024)).result()

A latent is named by an id: `seed-N` is the LDM's sample from seed N (drawn when first
asked for, exactly as `infd sample --seed N --n 1` draws it), `z-<16 hex>` a latent added
at start-up (from a z file or an encoded image). Ids are parsed, never used as paths.

One worker thread owns the model. Requests wait in one bounded queue (full: `ServiceBusy`,
which the app answers with 503); each time the worker is free it takes every waiting tile,
up to `max_batch`, and renders those of one latent in one renderer call (continuous
batching: no request waits for a batch to fill). A view (a region at up to 4096² pixels)
renders one window per worker turn, between the tile batches, so tiles never wait for a
whole view: each request's cost to the others is bounded by one window. Tiles are encoded to PNG/JPEG by a small
thread pool while the worker renders the next batch, and kept in an LRU cache of encoded
bytes; a tile asked for again while in flight shares the first request's future.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from infd import geometry
from infd.errors import InfdError, check_choice
from infd.geometry import Box, Size
from infd.models import NeuralFieldAutoencoder
from infd.rendering import LatentField
from infd.viewer.deepzoom import TILE_FORMATS, DeepZoom, encode_tile, render_tiles

DEFAULT_VIRTUAL_SIDE = 65536
MAX_SEED = 2**32 - 1
ZID_PATTERN = re.compile(r"seed-(0|[1-9][0-9]{0,9})|z-[0-9a-f]{16}")


class ServiceBusy(Exception):
    """The request queue is full; the client should retry shortly."""


class NotFound(InfdError):
    """A latent id or tile that does not exist (HTTP 404)."""


@dataclass(frozen=True)
class Latent:
    """A latent the viewer can show: z (1, C, h, w) on the CPU and its virtual image size."""

    zid: str
    z: torch.Tensor
    size: Size
    label: str
    reproduce: str  # how to get the same z again, for a shared view


def latent_id(z: torch.Tensor) -> str:
    """A content id for a latent: the same z always gets the same id."""
    data = z.detach().float().cpu().contiguous().numpy().tobytes()
    return "z-" + hashlib.blake2b(data, digest_size=8).hexdigest()


def virtual_size(aspect: float, side: int = DEFAULT_VIRTUAL_SIDE) -> Size:
    """(H, W) of the viewer's image: `side` pixels on the long side, the given width/height aspect (`geometry.fit_size`)."""
    return geometry.fit_size(side, aspect)


class LatentBook:
    """Resolves latent ids: latents added at start-up, and seeds sampled by the pipeline on demand."""

    def __init__(
        self,
        pipe=None,
        seed_size: Size = (DEFAULT_VIRTUAL_SIDE, DEFAULT_VIRTUAL_SIDE),
        steps: int = 50,
        sampler: str = "ddim",
        ckpt: str = "PIPELINE",
        dtype: torch.dtype | None = None,
        keep: int = 256,
    ):
        self.pipe, self.seed_size, self.steps, self.sampler, self.ckpt, self.dtype = pipe, seed_size, steps, sampler, ckpt, dtype
        self.added: dict[str, Latent] = {}
        self.sampled: OrderedDict[str, Latent] = OrderedDict()
        self.keep = keep
        self.lock = threading.Lock()
        if pipe is not None:
            pipe.use_sampler(sampler)

    @property
    def can_sample(self) -> bool:
        return self.pipe is not None

    def add(self, z: torch.Tensor, label: str, reproduce: str, size: Size) -> Latent:
        z = z.detach().float().cpu()
        latent = Latent(latent_id(z), z, geometry.check_size(size, "virtual image size"), label, reproduce)
        self.added[latent.zid] = latent
        return latent

    def check(self, zid: str) -> str:
        """`zid` if it names a latent this book can give, else NotFound with the reason."""
        if not isinstance(zid, str) or not ZID_PATTERN.fullmatch(zid):
            raise NotFound("unknown latent id; ids look like seed-42 or z-0123456789abcdef.")
        if zid.startswith("seed-"):
            if not self.can_sample:
                raise NotFound("this server has an autoencoder only, so it cannot draw samples; start it with an INFDPipeline (--ckpt PIPELINE) for seeds.")
            if int(zid[5:]) > MAX_SEED:
                raise NotFound(f"seeds go from 0 to {MAX_SEED}.")
        elif zid not in self.added:
            raise NotFound(f"latent {zid} is not on this server; it serves {', '.join(self.added) or 'seeds only'}.")
        return zid

    def size_of(self, zid: str) -> Size:
        self.check(zid)
        return self.added[zid].size if zid in self.added else self.seed_size

    def describe(self, zid: str) -> dict:
        """What the page shows about a latent, without sampling it."""
        self.check(zid)
        if zid in self.added:
            latent = self.added[zid]
            return {"zid": zid, "label": latent.label, "reproduce": latent.reproduce}
        seed = int(zid[5:])
        command = f"infd sample --ckpt {self.ckpt} --seed {seed} --n 1 --steps {self.steps} --sampler {self.sampler}"
        return {"zid": zid, "label": f"seed {seed}", "seed": seed, "reproduce": command}

    def get(self, zid: str) -> Latent:
        """The latent; a seed is sampled the first time (slow: call from the worker)."""
        self.check(zid)
        if zid in self.added:
            return self.added[zid]
        with self.lock:
            if zid in self.sampled:
                self.sampled.move_to_end(zid)
                return self.sampled[zid]
        seed = int(zid[5:])
        generator = [torch.Generator().manual_seed(seed)]  # as `infd sample` seeds sample i: seed + i
        z = self.pipe.sample_latents(1, self.steps, generator, dtype=self.dtype)
        info = self.describe(zid)
        latent = Latent(zid, z.float().cpu(), self.seed_size, info["label"], info["reproduce"])
        with self.lock:
            self.sampled[zid] = latent
            while len(self.sampled) > self.keep:
                self.sampled.popitem(last=False)
        return latent


class ByteCache:
    """A thread-safe LRU cache of bytes under a total size budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[object, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key) -> bytes | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self.lock:
            old = self.items.pop(key, None)
            self.bytes += len(value) - (len(old) if old is not None else 0)
            self.items[key] = value
            while self.bytes > self.max_bytes:
                _, dropped = self.items.popitem(last=False)
                self.bytes -= len(dropped)


@dataclass
class _TileJob:
    key: tuple[str, int, int, int]  # (zid, level, col, row)
    future: Future


@dataclass
class _Job:
    run: Callable[[], object]
    future: Future


@dataclass
class _ViewJob:
    steps: Iterator[None]  # renders one window per step; the generator returns the canvas
    future: Future


@dataclass
class Stats:
    requests: int = 0
    cache_hits: int = 0
    shared: int = 0  # requests that joined a tile already in flight
    rejected: int = 0
    tiles_rendered: int = 0
    batches: int = 0
    decodes: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        sizes = self.batch_sizes[-1000:]
        return {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "shared": self.shared,
            "rejected": self.rejected,
            "tiles_rendered": self.tiles_rendered,
            "batches": self.batches,
            "decodes": self.decodes,
            "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
        }


_STOP = object()


class TileService:
    """Deep Zoom tiles and views of latents, rendered by one worker thread (see the module docstring)."""

    def __init__(
        self,
        model: NeuralFieldAutoencoder,
        book: LatentBook,
        tile_size: int = 254,
        overlap: int = 1,
        tile_format: str = "png",
        max_batch: int = 32,
        max_queue: int = 256,
        cache_bytes: int = 256 * 2**20,
        fields: int = 4,
        encoders: int | None = None,
        dtype: torch.dtype | None = None,
        renderer: str | None = None,
        view_tile: int = 512,
    ):
        check_choice(tile_format, TILE_FORMATS, "tile format")
        encoders = encoders or max(2, min(8, (os.cpu_count() or 2) // 2))
        if max_batch < 1 or max_queue < 1 or fields < 1 or encoders < 1:
            raise InfdError("the batch, queue, field-cache and encoder counts must all be at least 1.")
        DeepZoom((1, 1), tile_size, overlap)  # checks the tile geometry once
        model.get_renderer(renderer)
        self.model, self.book = model, book
        self.tile_size, self.overlap, self.tile_format = tile_size, overlap, tile_format
        self.max_batch, self.dtype, self.renderer, self.view_tile = max_batch, dtype, renderer, view_tile
        self.cache = ByteCache(cache_bytes)
        self.stats = Stats()
        self._fields: OrderedDict[str, LatentField] = OrderedDict()
        self._max_fields = fields
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._pending: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._encoders = ThreadPoolExecutor(encoders, thread_name_prefix="infd-encode")
        self._worker = threading.Thread(target=self._run, name="infd-render", daemon=True)
        self._started = False

    # ------------------------------------------------------------ life cycle

    def start(self) -> TileService:
        if not self._started:
            self._started = True
            self._worker.start()
        return self

    def close(self) -> None:
        """Stop the worker after the requests already queued; cancel what is left (idempotent)."""
        if self._started and self._worker.is_alive():
            self._queue.put(_STOP)  # blocks while the queue is full: the worker is draining it
            self._worker.join()
        self._encoders.shutdown(wait=True)
        for item in self._drain():
            if item is not _STOP:
                item.future.cancel()

    def __enter__(self) -> TileService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ requests

    def zoom(self, zid: str) -> DeepZoom:
        return DeepZoom(self.book.size_of(zid), self.tile_size, self.overlap)

    def tile(self, zid: str, level: int, col: int, row: int) -> Future:
        """Future of the encoded tile (bytes). NotFound for a tile outside the pyramid, ServiceBusy when full."""
        if not self.zoom(zid).has_tile(level, col, row):
            raise NotFound(f"tile {col}_{row} of level {level} is outside the image of {zid}.")
        key = (zid, level, col, row)
        self.stats.requests += 1
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return _done(cached)
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                self.stats.shared += 1
                return pending
            future: Future = Future()
            self._enqueue(_TileJob(key, future))
            self._pending[key] = future
        return future

    def view(self, zid: str, box: Box, size: Size) -> Future:
        """Future of the region `box` of a latent rendered at `size`: (H, W, 3) uint8."""
        self.book.check(zid)
        size = geometry.check_size(size, "view size")

        def render_view() -> Iterator[None]:
            canvas = np.empty((*size, 3), dtype=np.uint8)
            for window, pixels in self._field(zid).tiles(size, self.view_tile, box):
                canvas[window.top : window.top + window.height, window.left : window.left + window.width] = pixels
                yield  # the worker serves waiting tiles between a view's windows
            return canvas

        future: Future = Future()
        self._enqueue(_ViewJob(render_view(), future))
        return future

    def latent(self, zid: str) -> Future:
        """Future of the Latent (sampling a seed happens on the worker, in turn with rendering)."""
        self.book.check(zid)
        return self.submit(lambda: self.book.get(zid))

    def submit(self, run: Callable[[], object]) -> Future:
        """Run `run()` on the worker (which owns the model); ServiceBusy when the queue is full."""
        future: Future = Future()
        self._enqueue(_Job(run, future))
        return future

    def _enqueue(self, item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.stats.rejected += 1
            raise ServiceBusy("the tile queue is full; retry in a moment.") from None

    # ------------------------------------------------------------ the worker

    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        """Each turn: every waiting tile (up to max_batch), the waiting jobs, then one window
        of each view in progress; so a tile waits at most one view window, never a whole view."""
        views: list[_ViewJob] = []
        while True:
            items = [] if views else [self._queue.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            tiles = [item for item in items if isinstance(item, _TileJob)]
            for zid, group in itertools.groupby(sorted(tiles, key=lambda t: t.key[0]), key=lambda t: t.key[0]):
                self._render_tiles(zid, list(group))
            for job in (item for item in items if isinstance(item, _Job)):
                _settle(job.future, job.run)
            views += [item for item in items if isinstance(item, _ViewJob)]
            views = [view for view in views if _advance(view)]
            if stop:
                for view in views:
                    view.future.set_exception(ServiceBusy("the viewer is shutting down."))
                return

    def _field(self, zid: str) -> LatentField:
        """The latent's decoded field, from a small LRU (decoding phi is the expensive part)."""
        if zid in self._fields:
            self._fields.move_to_end(zid)
            return self._fields[zid]
        latent = self.book.get(zid)
        self._fields[zid] = LatentField(self.model, latent.z, renderer=self.renderer, dtype=self.dtype)
        self.stats.decodes += 1
        while len(self._fields) > self._max_fields:
            self._fields.popitem(last=False)
        return self._fields[zid]

    def _render_tiles(self, zid: str, jobs: list[_TileJob]) -> None:
        try:
            field_ = self._field(zid)
            zoom = self.zoom(zid)
            crops = render_tiles(field_, zoom, [job.key[1:] for job in jobs])
            self.stats.batches += 1
            self.stats.tiles_rendered += len(jobs)
            self.stats.batch_sizes.append(len(jobs))
            del self.stats.batch_sizes[:-1000]
        except Exception as error:  # every waiting request learns of it; the worker goes on
            for job in jobs:
                self._finish(job, error=error)
            return
        for job, crop in zip(jobs, crops, strict=True):
            self._encoders.submit(self._encode, job, crop)

    def _encode(self, job: _TileJob, crop: torch.Tensor) -> None:
        try:
            data = encode_tile(crop, self.tile_format)
        except Exception as error:
            self._finish(job, error=error)
            return
        self.cache.put(job.key, data)
        self._finish(job, data)

    def _finish(self, job: _TileJob, data: bytes | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            self._pending.pop(job.key, None)
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(data)


def _advance(view: _ViewJob) -> bool:
    """Render the view's next window; False once it is finished (its future then holds the canvas or the error)."""
    try:
        next(view.steps)
    except StopIteration as finished:
        view.future.set_result(finished.value)
        return False
    except Exception as error:  # the request learns of it; the worker goes on
        view.future.set_exception(error)
        return False
    return True


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _settle(future: Future, run: Callable[[], object]) -> None:
    try:
        future.set_result(run())
    except Exception as error:
        future.set_exception(error)


def open_latents(
    ckpt,
    device: str | torch.device = "auto",
    z_file=None,
    image=None,
    seed: int | None = None,
    size: Size | None = None,
    steps: int | None = None,
    sampler: str = "ddim",
    dtype: torch.dtype | None = None,
) -> tuple[NeuralFieldAutoencoder, LatentBook, str]:
    """Load what `infd serve` shows: (autoencoder, book, id of the first latent).

    `ckpt` is an INFDPipeline (seeds can be drawn) or an autoencoder alone (then `z_file`
    or `image` gives the latent). `size` is the virtual image's (H, W); by default 65536
    on the long side, at the image's aspect for `image`.
    """
    from pathlib import Path

    from infd.diffusion import SAMPLERS, check_sampling
    from infd.diffusion.pipeline import load_pipeline
    from infd.images import image_size
    from infd.latents import load_latent_for
    from infd.rendering import encode, pick_device
    from infd.store import find_checkpoint, find_pipeline, load_autoencoder

    if sum(x is not None for x in (z_file, image, seed)) > 1:
        raise InfdError("pass at most one of --z, --image and --seed.")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InfdError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed}.")
    check_choice(sampler, SAMPLERS, "sampler")
    device = pick_device(device) if isinstance(device, str) else device
    try:
        folder = find_pipeline(ckpt)
    except InfdError:
        folder = None
    if folder is not None:
        pipe = load_pipeline(folder, device)
        model = pipe.autoencoder
        steps = pipe.default_steps if steps is None else steps  # the pipeline's own (200 for the paper's models)
        check_sampling(pipe.scheduler, steps, 0.0)
    else:
        pipe, model = None, load_autoencoder(find_checkpoint(ckpt), device)
        if z_file is None and image is None:
            raise InfdError(f"'{ckpt}' is an autoencoder without a diffusion model, so it cannot draw samples; pass --z FILE or --image FILE to view.")
    square = size or (DEFAULT_VIRTUAL_SIDE, DEFAULT_VIRTUAL_SIDE)
    book = LatentBook(pipe, square, steps or 50, sampler, str(ckpt), dtype)
    if z_file is not None:
        z, metadata = load_latent_for(model, z_file)
        if z.shape[0] != 1:
            raise InfdError(f"'{z_file}' holds {z.shape[0]} latents; the viewer shows one.")
        label = Path(z_file).name + (f" (seed {metadata['seed']})" if "seed" in metadata else "")
        return model, book, book.add(z, label, f"infd serve --ckpt {ckpt} --z {z_file}", square).zid
    if image is not None:
        h, w = image_size(image)
        z = encode(model, image)
        latent = book.add(z, Path(image).name, f"infd serve --ckpt {ckpt} --image {image}", size or virtual_size(w / h))
        return model, book, latent.zid
    return model, book, f"seed-{seed or 0}"
