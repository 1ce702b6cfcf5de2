"""Viewer tile serving (latency, tiles/s vs clients) and gigapixel TIFF export (time, peak memory vs size).

    python benchmarks/serve.py --device cpu                 # demo autoencoder: tiles in-process and over HTTP; exports to 8192²
    python benchmarks/serve.py --device cuda                # paper-shaped model, bf16: tiles in-process; exports to 32768²
    python benchmarks/serve.py --smoke                      # tiny model, short rows, seconds

Details (clients, tiles, modes, export): benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from harness import MIB, PAPER_AE, REPO_ROOT, TINY_AE, Benchmark, Panel, Table, autoencoder, goal, lines, measure_fresh, parse_sizes, random_latent, size_fields, size_ticks

from infd.latents import save_latent
from infd.rendering import LatentField
from infd.viewer.deepzoom import export_tiff
from infd.viewer.service import LatentBook, TileService

DEMO_CKPT = REPO_ROOT / "weights" / "demo-ae"
VIRTUAL, TILE_LEVEL = (65536, 65536), 16  # the finest level of 65536²: 258 x 258 distinct tiles, so the tile cache never answers
GOAL_TILES_PER_S, GOAL_P99_MS, GOAL_MEMORY_RATIO = 400, 250, 1.2  # H100, 32 clients, 256² tiles; export peak RSS largest / smallest
COLUMNS = dict(mode="mode", clients="clients", batching="batching", tiles="tiles", tiles_per_s="tiles/s", p50_ms="p50 ms", p99_ms="p99 ms", mean_batch="mean batch")
COLUMNS.update(size="size", renderer_width="width", median_s="seconds", mpix_per_s="MP/s", peak_mib="peak RSS MiB", gpu_peak_mib="GPU peak MiB", canvas_mib="image MiB (not held)")
COLUMNS.update(file_mib="file MiB", note="note")
STYLES = {(mode, f"batching {b}"): dict(color=c) for mode, b, c in (("in-process", "on", "tab:blue"), ("in-process", "off", "tab:cyan"), ("http", "on", "tab:red"), ("http", "off", "tab:orange"))}


def closed_loop(clients: int, request, seconds: float, max_tiles: int) -> tuple[list[float], float]:
    """`clients` threads, each calling request(tile) back to back on distinct tiles of the finest level; latencies (s) and wall time."""
    tiles, lock, latencies = ((TILE_LEVEL, i % 258, i // 258) for i in itertools.count(258 * 258 // 3)), threading.Lock(), []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if len(latencies) >= max_tiles:
                    return
                tile = next(tiles)
            start = time.perf_counter()
            request(tile)
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client(), range(clients)))
    return latencies, time.perf_counter() - start


def tile_row(mode: str, clients: int, batching: bool, request, stats, args) -> dict:
    """Warm up (cuDNN, allocator, these batch shapes), then measure; mean_batch from the service's counters."""
    closed_loop(clients, request, args.warmup, 4 * clients)
    before = stats()
    latencies, wall = closed_loop(clients, request, args.seconds, args.max_tiles)
    after, ordered = stats(), sorted(latencies)
    row = {"section": "tiles", "mode": mode, "clients": clients, "batching": "batching on" if batching else "batching off", "tiles": len(latencies), "seconds": wall}
    row["mean_batch"] = (after["tiles_rendered"] - before["tiles_rendered"]) / batches if (batches := after["batches"] - before["batches"]) else None
    if latencies:
        row.update(tiles_per_s=len(latencies) / wall, p50_ms=statistics.median(latencies) * 1000, p99_ms=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000)
    return row


@contextlib.contextmanager
def infd_serve(ckpt, options: list[str]):
    """`infd serve` in a child process on a free loopback port (what a user runs): yields its URL and /api/info."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from infd.cli import main; main()", "serve", "--ckpt", str(ckpt), "--port", str(port), *options]
    process, url = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):  # 3 minutes
            if process.poll() is not None:
                raise RuntimeError(f"infd serve exited: {process.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                info = httpx.get(url + "api/info", timeout=2).json()
                break
            time.sleep(0.3)
        else:
            raise RuntimeError("infd serve did not start within 3 minutes")
        yield url, info
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def in_process(model, spec: dict, batching: bool, args):
    """`infd.viewer.service.TileService` driven directly (what runs on a GPU machine without fastapi): yields request(tile) and stats()."""
    zid = (book := LatentBook(seed_size=VIRTUAL)).add(random_latent(model), "random", "-", VIRTUAL).zid
    with TileService(model, book, max_batch=32 if batching else 1, max_queue=4096, cache_bytes=0, dtype=args.dtype) as service:
        yield (lambda tile: service.tile(zid, *tile).result()), service.stats.as_dict


@contextlib.contextmanager
def over_http(model, spec: dict, batching: bool, args):
    """`infd serve` of the model (saved first if random) and a random z, driven with httpx: yields request(tile) and stats()."""
    import httpx

    with tempfile.TemporaryDirectory() as folder:
        ckpt = spec.get("ckpt") or Path(folder) / "ae"
        if not spec.get("ckpt"):
            model.save_pretrained(ckpt)
        save_latent(Path(folder) / "z.safetensors", random_latent(model))
        options = ["--z", str(Path(folder) / "z.safetensors"), "--device", args.device, "--batch", "32" if batching else "1", "--queue", "4096", "--cache-mib", "0"]
        with infd_serve(ckpt, options + ["--bf16"] * args.bf16) as (url, info), httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=max(args.clients) + 4)) as http:
            tile_url = f"dzi/{info['first']}_files/{{}}/{{}}_{{}}.png"
            yield (lambda tile: http.get(tile_url.format(*tile)).raise_for_status()), (lambda: http.get("api/stats").json())


def tile_rows(bench: Benchmark, args, spec: dict, model) -> None:
    """Each mode, with batching (up to 32 tiles per renderer call) and without (1), at each client count."""
    for mode in args.modes:
        for batching in (True, False) if mode == "in-process" or not args.smoke else (True,):
            with (in_process if mode == "in-process" else over_http)(model, spec, batching, args) as (request, stats):
                for clients in args.clients:
                    bench.add_row(tile_row(mode, clients, batching, request, stats, args))


def export_setup(spec: dict, width: int | None, size: tuple[int, int], device_name: str, bf16: bool, folder: str):
    """In a fresh process (harness.measure_fresh): the field; a 256² export to warm up; the export of `size` (GPU peak: weights included)."""
    model, info = autoencoder(spec, torch.device(device_name), width), {}
    field = LatentField(model, random_latent(model), dtype=torch.bfloat16 if bf16 else None)

    def run() -> None:
        export_tiff(field, size, Path(folder) / "export.tif", progress=False)
        info["file_mib"] = (Path(folder) / "export.tif").stat().st_size / MIB
        if field.device.type == "cuda":
            info["gpu_peak_mib"] = torch.cuda.max_memory_allocated(field.device) / MIB

    return run, functools.partial(export_tiff, field, (256, 256), Path(folder) / "warm.tif", progress=False), info


def export_row(spec: dict, size: tuple[int, int], args) -> dict:
    row = {"section": "export", **size_fields(size), "renderer_width": args.export_width or "model", "canvas_mib": size[0] * size[1] * 3 / MIB}
    with tempfile.TemporaryDirectory(prefix="infd-export-bench-") as folder:
        row.update(measure_fresh(export_setup, spec, args.export_width, size, args.device, args.bf16, folder, preload=["infd.viewer.deepzoom"]))
    return dict(row, mpix_per_s=row["megapixels"] / row["median_s"]) if "median_s" in row else row


def check_goals(device: str, rows: list[dict]) -> list[dict]:
    goals = []
    for r in rows:
        if device == "cuda" and r["section"] == "tiles" and r["clients"] == 32 and r["batching"] == "batching on" and r.get("tiles_per_s"):
            goals.append(goal(f"{r['mode']} tiles/s, 32 clients", r["tiles_per_s"], GOAL_TILES_PER_S, "tiles/s"))
            goals.append(goal(f"{r['mode']} p99, 32 clients", r["p99_ms"], GOAL_P99_MS, "ms", lower_is_better=True))
    if len(peaks := [r for r in rows if r["section"] == "export" and "peak_mib" in r]) >= 2:
        small, big = min(peaks, key=lambda r: r["megapixels"]), max(peaks, key=lambda r: r["megapixels"])
        goals.append(goal(f"export peak RSS {big['size']} / {small['size']}", big["peak_mib"] / small["peak_mib"], GOAL_MEMORY_RATIO, "x", lower_is_better=True))
    return goals


def panels(rows: list[dict], model_text: str) -> list[Panel]:
    tiles, exports = [r for r in rows if r["section"] == "tiles"], [r for r in rows if r["section"] == "export"]
    by_clients = [lines(tiles, "clients", key, ("mode", "batching"), STYLES) for key in ("tiles_per_s", "p99_ms")]
    ticks, sizes = {r["clients"]: str(r["clients"]) for r in tiles}, size_ticks(exports)
    memory = lines(exports, "megapixels", "peak_mib", label="peak RSS") + lines(exports, "megapixels", "gpu_peak_mib", label="GPU peak")
    memory += lines(exports, "megapixels", "canvas_mib", label="the image itself (not held)", color="lightgray", linestyle=":", marker="")
    return [
        Panel("Tiles per second (256² PNG)", "concurrent clients", "tiles / s", by_clients[0], note=model_text, xticks=ticks),
        Panel("Tile latency p99", "concurrent clients", "ms", by_clients[1], xticks=ticks),
        Panel("Export time (pyramidal BigTIFF)", "output size", "seconds", lines(exports, "megapixels", "median_s", label="export"), xticks=sizes),
        Panel("Export peak memory (a fresh process per size)", "output size", "MiB", memory, xticks=sizes),
    ]


def main() -> None:
    bench = Benchmark("serve", __doc__)
    bench.add("--ckpt", type=Path, help="autoencoder to serve (default: weights/demo-ae on CPU, a random paper-shaped one on CUDA)")
    bench.add("--clients", help="concurrent clients to measure (default 1,8,32; 1,4 with --smoke)")
    bench.add("--seconds", type=float, default=20.0, help="longest measurement per row")
    bench.add("--max-tiles", type=int, default=2000, help="most tiles per row")
    bench.add("--warmup", type=float, default=3.0, help="seconds of warm-up per row (not measured)")
    bench.add("--modes", help="in-process,http (default: both on CPU where fastapi/uvicorn/httpx import; in-process on CUDA)")
    bench.add("--bf16", action=argparse.BooleanOptionalAction, help="render in bfloat16 (default: on CUDA)")
    bench.add("--export-sizes", help="export sizes (default CPU 1024,2048,4096,8192; CUDA up to 32768)")
    bench.add("--export-width", type=int, help="renderer width of the export sweep (default: 8 on CPU, the model's on CUDA)")
    bench.add("--no-export", action="store_true")
    bench.add("--no-tiles", action="store_true")
    args = bench.parse()
    if args.smoke:
        args.seconds, args.max_tiles, args.warmup, args.clients, args.export_sizes = 0.5, 24, 0.1, args.clients or "1,4", args.export_sizes or "256,512"
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.dtype, args.clients = torch.bfloat16 if args.bf16 else None, [int(c) for c in (args.clients or "1,8,32").split(",")]
    args.export_sizes = parse_sizes(args.export_sizes or ("1024,2048,4096,8192" if args.device == "cpu" else "1024,2048,4096,8192,16384,32768"))
    web = args.device == "cpu" and all(importlib.util.find_spec(m) for m in ("fastapi", "httpx", "uvicorn"))
    args.modes = [] if args.no_tiles else (args.modes or ("in-process,http" if web else "in-process")).split(",")
    args.export_width = args.export_width or (8 if args.device == "cpu" else None)
    ckpt = args.ckpt or (None if args.smoke or args.device == "cuda" or not DEMO_CKPT.is_dir() else DEMO_CKPT)
    spec = {"ckpt": str(ckpt)} if ckpt else {"config": TINY_AE if args.smoke else PAPER_AE}
    model = autoencoder(spec, torch.device(args.device))
    model_text = f"{spec.get('ckpt', 'random weights')}: phi {'x'.join(map(str, model.feature_shape))}, CLIF width {model.config.renderer_hidden}" + ", bf16" * args.bf16
    tables = [Table(f"Tiles — {model_text}", COLUMNS, "tiles"), Table("Export (tiled pyramidal BigTIFF, deflate; a fresh process per size)", COLUMNS, "export")]
    bench.start("viewer benchmark", tables, model=model_text, modes=args.modes, seconds=args.seconds, max_tiles=args.max_tiles, export_width=args.export_width)
    with bench.interruptible():
        tile_rows(bench, args, spec, model)
        for size in [] if args.no_export else args.export_sizes:
            bench.add_row(export_row(spec, size, args))
    bench.finish(check_goals(args.device, bench.rows), panels(bench.rows, model_text), columns=2)


if __name__ == "__main__":
    main()
