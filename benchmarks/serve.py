"""Viewer tile serving (latency, tiles/s) and gigapixel export (time, peak memory) vs size.

    python benchmarks/serve.py --quick                      # smoke test: tiny model, short rows (HTTP with batching only)
    python benchmarks/serve.py --device cpu                 # demo autoencoder: tiles in-process and over HTTP; exports to 8192²
    PYTHONPATH=. python3 benchmarks/serve.py --device cuda  # paper-shaped model, bf16: tiles in-process; exports to 32768²
    python benchmarks/serve.py --screenshot docs/images/viewer.png --ckpt weights/demo-ae --image assets/sample.jpg

Tiles: `--clients` closed-loop clients (1, 8, 32) each ask for one 256² Deep Zoom tile
(tile 254 + 1 px overlap) at a time, all distinct (a deep level of the 65536² virtual
image, so the tile cache never answers), for `--seconds` or `--max-tiles`, whichever ends
first, with batching (up to 32 tiles per renderer call) and without (1). Latency is from
the request to the encoded PNG. "in-process" drives `infd.viewer.service.TileService`
directly (what runs on a GPU machine without fastapi); "http" starts `infd serve` in a
child process on 127.0.0.1 and drives it with httpx (loopback only).

Export: `infd.viewer.deepzoom.export_tiff` (tiled pyramidal BigTIFF, deflate) of each size, in a
fresh process per size: wall time, peak RSS, and on CUDA the peak GPU memory. On CPU
the export sweep uses a narrow renderer (`--export-width`, default 8) so that 8192²
finishes; on CUDA the real width.

Results: a table, benchmarks/results/serve-<device>[-quick].json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import MIB, REPO_ROOT, BenchmarkRun, Column, Panel, Series, cuda_peak_bytes, goal, make_console, peak_rss_bytes, plot_panels, reset_cuda_peak, run_in_fresh_process

from infd.geometry import parse_size
from infd.models import NeuralFieldAutoencoder
from infd.rendering import LatentField
from infd.store import find_checkpoint, load_autoencoder
from infd.viewer.deepzoom import export_tiff
from infd.viewer.service import LatentBook, TileService

# The paper's autoencoder (z 3x64x64, phi 128x256x256, CLIF width 256), random weights.
PAPER_MODEL = dict(input_size=256, latent_channels=3, block_out_channels=(128, 256, 256), layers_per_block=2, renderer_hidden=256, renderer_blocks=2)
QUICK_MODEL = dict(input_size=32, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, renderer_hidden=8, renderer_blocks=1)
DEMO_CKPT = REPO_ROOT / "weights" / "demo-ae"
VIRTUAL = (65536, 65536)
TILE_LEVEL = 16  # the finest level of 65536²: 258 x 258 distinct tiles
GOAL_TILES_PER_S = 400  # H100, 32 clients, 256² tiles
GOAL_P99_MS = 250
GOAL_MEMORY_RATIO = 1.2


# ---------------------------------------------------------------- model


def model_spec(args) -> dict:
    """{"ckpt": path} or {"config": NeuralFieldAutoencoder options} (random weights)."""
    if args.ckpt:
        return {"ckpt": str(args.ckpt)}
    if args.quick:
        return {"config": QUICK_MODEL}
    if args.device == "cuda" or not DEMO_CKPT.is_dir():
        return {"config": PAPER_MODEL}
    return {"ckpt": str(DEMO_CKPT)}


def build_model(spec: dict, device: torch.device, width: int | None = None) -> NeuralFieldAutoencoder:
    """The model of `spec`; with `width`, the same shapes with that renderer width and random weights."""
    if spec.get("ckpt") and width is None:
        return load_autoencoder(spec["ckpt"], device)
    torch.manual_seed(0)
    if spec.get("ckpt"):
        config = dict(NeuralFieldAutoencoder.load_config(find_checkpoint(spec["ckpt"])))
    else:
        config = dict(spec["config"])
    if width is not None:
        config["renderer_hidden"] = width
    return NeuralFieldAutoencoder.from_config(config).to(device).eval()


def random_latent(model: NeuralFieldAutoencoder) -> torch.Tensor:
    return torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))


def describe_model(model: NeuralFieldAutoencoder, spec: dict) -> str:
    source = "random weights"
    if spec.get("ckpt"):
        path = Path(spec["ckpt"]).resolve()
        source = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
    return f"{source}: phi {'x'.join(map(str, model.feature_shape))}, CLIF width {model.config.renderer_hidden}"


# ---------------------------------------------------------------- tiles


def distinct_tiles():
    """(level, col, row) of the finest level, row-major: thousands of tiles, none repeated."""
    side = -(-VIRTUAL[1] // 254)
    return ((TILE_LEVEL, i % side, i // side) for i in itertools.count(side * side // 3))


def closed_loop(clients: int, request, seconds: float, max_tiles: int) -> tuple[list[float], float]:
    """`clients` threads, each calling request(tile) back to back; latencies (s) and wall time."""
    tiles = distinct_tiles()
    lock = threading.Lock()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if len(latencies) >= max_tiles:
                    return
                tile = next(tiles)
            start = time.perf_counter()
            request(tile)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start


def tile_row(mode: str, device: str, clients: int, batching: bool, latencies: list[float], wall: float, mean_batch=None) -> dict:
    ordered = sorted(latencies)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "mode": mode,
        "device": device,
        "clients": clients,
        "batching": "on" if batching else "off",
        "tiles": len(latencies),
        "seconds": wall,
        "tiles_per_s": len(latencies) / wall if wall else None,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": pick(0.99) if latencies else None,
        "mean_batch": mean_batch,
    }


def measure_in_process(model, dtype, clients: int, batching: bool, args, device: str) -> dict:
    book = LatentBook(seed_size=VIRTUAL)
    zid = book.add(random_latent(model), "random", "-", VIRTUAL).zid
    service = TileService(model, book, max_batch=32 if batching else 1, max_queue=4096, cache_bytes=0, dtype=dtype)
    with service:

        def request(tile):
            return service.tile(zid, *tile).result()

        closed_loop(clients, request, args.warmup, 4 * clients)  # cuDNN/allocator warm-up on these batch shapes
        before = service.stats.as_dict()
        latencies, wall = closed_loop(clients, request, args.seconds, args.max_tiles)
        after = service.stats.as_dict()
    return tile_row("in-process", device, clients, batching, latencies, wall, mean_batch(before, after))


def mean_batch(before: dict, after: dict) -> float | None:
    """Tiles per renderer call between two snapshots of the service's counters."""
    batches = after["batches"] - before["batches"]
    return (after["tiles_rendered"] - before["tiles_rendered"]) / batches if batches else None


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`infd serve` in a child process on a loopback port (what a user runs), stopped on exit."""

    def __init__(self, ckpt: Path, options: list[str]):
        self.port = free_port()
        command = [sys.executable, "-c", "from infd.cli import main; main()", "serve", "--ckpt", str(ckpt), "--port", str(self.port), *options]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> ServeProcess:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"infd serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                self.info = httpx.get(self.url + "api/info", timeout=2).json()
                return self
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("infd serve did not start within 180 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def saved_model_and_latent(spec: dict, folder: Path) -> tuple[Path, Path]:
    """A checkpoint folder and a z file for `infd serve` (random models are saved first)."""
    from infd.latents import save_latent

    model = build_model(spec, torch.device("cpu"))
    ckpt = Path(spec["ckpt"]) if spec.get("ckpt") else folder / "ae"
    if not spec.get("ckpt"):
        model.save_pretrained(ckpt)
    save_latent(folder / "z.safetensors", random_latent(model))
    return ckpt, folder / "z.safetensors"


def measure_http(server: ServeProcess, clients: int, batching: bool, args, device: str) -> dict:
    import httpx

    zid = server.info["first"]
    with httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as http:

        def request(tile) -> None:
            level, col, row = tile
            response = http.get(f"dzi/{zid}_files/{level}/{col}_{row}.png")
            response.raise_for_status()

        closed_loop(clients, request, args.warmup, 4 * clients)
        before = http.get("api/stats").json()
        latencies, wall = closed_loop(clients, request, args.seconds, args.max_tiles)
        after = http.get("api/stats").json()
    return tile_row("http", device, clients, batching, latencies, wall, mean_batch(before, after))


# ---------------------------------------------------------------- export


def export_in_fresh_process(spec: dict, width: int | None, size: tuple[int, int], device_name: str, bf16: bool, folder: str, threads: int) -> dict:
    """Runs in a new process: one TIFF export of `size`; wall time, peak RSS (and GPU peak)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = build_model(spec, device, width)
    field = LatentField(model, random_latent(model).to(device), dtype=torch.bfloat16 if bf16 else None)
    export_tiff(field, (256, 256), Path(folder) / "warm.tif", progress=False)  # cuDNN and allocator warm-up
    base = reset_cuda_peak(device) if device.type == "cuda" else 0
    path = Path(folder) / "export.tif"
    start = time.perf_counter()
    export_tiff(field, size, path, progress=False)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_rss": peak_rss_bytes(), "file_bytes": path.stat().st_size}
    if device.type == "cuda":
        result["gpu_peak"] = cuda_peak_bytes(device) - base
    path.unlink()
    return result


def measure_export(spec, width, size, args) -> dict:
    folder = tempfile.mkdtemp(prefix="infd-export-bench-")
    try:
        result = run_in_fresh_process(export_in_fresh_process, spec, width, size, args.device, args.bf16, folder, torch.get_num_threads(), preload=["infd.viewer.deepzoom"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    h, w = size
    row = {"size": f"{w}x{h}", "megapixels": h * w / 1e6, "device": args.device, "renderer_width": width or "model"}
    if "error" in result:
        return dict(row, note=result["error"])
    row.update(
        seconds=result["seconds"],
        mpix_per_s=h * w / 1e6 / result["seconds"],
        peak_rss_mib=result["peak_rss"] / MIB,
        file_mib=result["file_bytes"] / MIB,
        canvas_mib=h * w * 3 / MIB,
    )
    if "gpu_peak" in result:
        row["gpu_peak_mib"] = result["gpu_peak"] / MIB
    return row


# ---------------------------------------------------------------- screenshot


def screenshot(args, path: Path) -> None:
    """The viewer in headless chromium (zoomed by --screenshot-zoom), saved as a PNG (for the README)."""
    from playwright.sync_api import sync_playwright

    options = ["--device", args.device]
    if args.image:
        options += ["--image", str(args.image)]
    if args.seed is not None:
        options += ["--seed", str(args.seed)]
    with ServeProcess(args.ckpt or DEMO_CKPT, options) as server:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=os.environ.get("INFD_CHROMIUM", "/usr/bin/chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(300_000)
            page.goto(server.url)
            loaded = "() => { const i = window.infdViewer && window.infdViewer.world.getItemAt(0); return i && i.getFullyLoaded(); }"
            page.wait_for_function(loaded)
            if args.screenshot_zoom != 1:
                page.evaluate(f"window.infdViewer.viewport.zoomBy({args.screenshot_zoom}, undefined, true)")
                page.wait_for_timeout(500)
                page.wait_for_function(loaded)
            page.wait_for_timeout(500)
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path))
            browser.close()


# ---------------------------------------------------------------- goals, table, plot


def check_goals(device: str, tiles: list[dict], exports: list[dict]) -> list[dict]:
    goals = []
    for row in tiles:
        if device == "cuda" and row["clients"] == 32 and row["batching"] == "on" and row["tiles_per_s"]:
            goals.append(goal(f"{row['mode']} tiles/s, 32 clients", row["tiles_per_s"], GOAL_TILES_PER_S, "tiles/s"))
            goals.append(goal(f"{row['mode']} p99, 32 clients", row["p99_ms"], GOAL_P99_MS, "ms", lower_is_better=True))
    peaks = [r for r in exports if "peak_rss_mib" in r]
    if len(peaks) >= 2:
        small, big = min(peaks, key=lambda r: r["megapixels"]), max(peaks, key=lambda r: r["megapixels"])
        goals.append(goal(f"export peak RSS {big['size']} / {small['size']}", big["peak_rss_mib"] / small["peak_rss_mib"], GOAL_MEMORY_RATIO, "x", lower_is_better=True))
    return goals


TILE_COLUMNS = [
    Column("mode", "mode", justify="left"),
    Column("device", "device"),
    Column("clients", "clients"),
    Column("batching", "batching"),
    Column("tiles", "tiles"),
    Column("tiles_per_s", "tiles/s", lambda v: f"{v:.1f}"),
    Column("p50_ms", "p50 ms", lambda v: f"{v:.0f}"),
    Column("p99_ms", "p99 ms", lambda v: f"{v:.0f}"),
    Column("mean_batch", "mean batch", lambda v: f"{v:.1f}"),
]
EXPORT_COLUMNS = [
    Column("size", "size"),
    Column("renderer_width", "width"),
    Column("seconds", "seconds", lambda v: f"{v:.1f}"),
    Column("mpix_per_s", "MP/s", lambda v: f"{v:.2f}"),
    Column("peak_rss_mib", "peak RSS MiB", lambda v: f"{v:.0f}"),
    Column("gpu_peak_mib", "GPU peak MiB", lambda v: f"{v:.0f}"),
    Column("canvas_mib", "image MiB (not held)", lambda v: f"{v:.0f}"),
    Column("file_mib", "file MiB", lambda v: f"{v:.0f}"),
    Column("note", "note", justify="left"),
]


def plot(path: Path, machine: dict, tiles: list[dict], exports: list[dict], model_text: str) -> None:
    colors = {("in-process", "on"): "tab:blue", ("in-process", "off"): "tab:cyan", ("http", "on"): "tab:red", ("http", "off"): "tab:orange"}

    def tile_series(key: str) -> list[Series]:
        lines = []
        for (mode, batching), color in colors.items():
            points = sorted((r["clients"], r[key]) for r in tiles if r["mode"] == mode and r["batching"] == batching and r.get(key))
            if points:
                lines.append(Series(f"{mode}, batching {batching}", [p[0] for p in points], [p[1] for p in points], dict(color=color)))
        return lines

    clients = sorted({r["clients"] for r in tiles})
    ticks = {c: str(c) for c in clients}
    panels = [
        Panel("Tiles per second (256² PNG)", "concurrent clients", "tiles / s", tile_series("tiles_per_s"), note=model_text, xticks=ticks),
        Panel("Tile latency p99", "concurrent clients", "ms", tile_series("p99_ms"), xticks=ticks),
    ]
    done = sorted((r for r in exports if "seconds" in r), key=lambda r: r["megapixels"])
    if done:
        x = [r["megapixels"] for r in done]
        sizes = {r["megapixels"]: r["size"].split("x")[0] + "²" for r in done}
        panels.append(Panel("Export time (pyramidal BigTIFF)", "output size", "seconds", [Series("export", x, [r["seconds"] for r in done])], xticks=sizes))
        memory = [
            Series("peak RSS", x, [r["peak_rss_mib"] for r in done]),
            Series("the image itself (not held)", x, [r["canvas_mib"] for r in done], dict(color="lightgray", linestyle=":", marker="")),
        ]
        panels.append(Panel("Export peak memory", "output size", "MiB", memory, xticks=sizes))
    title = f"infd serve / export benchmark — {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {machine['date'][:10]}"
    plot_panels(path, panels, title)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ckpt", type=Path, help="autoencoder to serve (default: weights/demo-ae on CPU, a random paper-shaped one on CUDA)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients to measure")
    parser.add_argument("--seconds", type=float, default=20.0, help="longest measurement per row")
    parser.add_argument("--max-tiles", type=int, default=2000, help="most tiles per row")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per row (not measured)")
    parser.add_argument("--modes", default=None, help="in-process,http (default: both where fastapi/uvicorn/httpx import; in-process on CUDA)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="render in bfloat16 (default: on for CUDA)")
    parser.add_argument("--export-sizes", help="export sizes (default CPU 1024,2048,4096,8192; CUDA up to 32768)")
    parser.add_argument("--export-width", type=int, help="renderer width of the export sweep (default: 8 on CPU, the model's on CUDA)")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--no-tiles", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny model, short rows, small exports: a smoke test")
    parser.add_argument("--screenshot", type=Path, help="only take a screenshot of the viewer into this PNG (needs chromium)")
    parser.add_argument("--image", type=Path, help="with --screenshot: the image to show (encoded by --ckpt)")
    parser.add_argument("--seed", type=int, help="with --screenshot and a pipeline --ckpt: the sample to show")
    parser.add_argument("--screenshot-zoom", type=float, default=1.0, help="with --screenshot: zoom factor from the whole image")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    if args.quick:
        args.seconds, args.max_tiles, args.warmup = 1.5, 100, 0.25
        args.export_sizes = args.export_sizes or "256,1024"
        args.threads = args.threads or 1
    default_exports = "1024,2048,4096,8192" if args.device == "cpu" else "1024,2048,4096,8192,16384,32768"
    args.export_sizes = [parse_size(s) for s in (args.export_sizes or default_exports).split(",")]
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.modes is None:
        try:
            import fastapi  # noqa: F401 (availability check)
            import httpx  # noqa: F401
            import uvicorn  # noqa: F401

            args.modes = "in-process,http" if args.device == "cpu" else "in-process"
        except ImportError:
            args.modes = "in-process"
    args.modes = args.modes.split(",")
    if args.export_width is None and args.device == "cpu":
        args.export_width = 8
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.screenshot:
        screenshot(args, args.screenshot)
        make_console().print(f"wrote {args.screenshot}")
        return
    run = BenchmarkRun("serve", device, "quick" if args.quick else "", args.out, "viewer benchmark")
    console = run.console
    spec = model_spec(args)
    model = build_model(spec, device)
    dtype = torch.bfloat16 if args.bf16 else None
    model_text = describe_model(model, spec) + (", bf16" if args.bf16 else "")
    console.print(f"model: {model_text}")
    tiles: list[dict] = []
    exports: list[dict] = []

    def save() -> None:
        goals = check_goals(args.device, tiles, exports)
        run.save(tiles + exports, model=model_text, goals=goals, tile_rows=len(tiles))
        plot(run.png_path, run.machine, tiles, exports, model_text)

    if not args.no_tiles:
        with tempfile.TemporaryDirectory() as folder:
            for mode in args.modes:
                for batching in (True, False) if mode == "in-process" or not args.quick else (True,):
                    server = None
                    if mode == "http":
                        ckpt, z_file = saved_model_and_latent(spec, Path(folder))
                        options = ["--z", str(z_file), "--device", args.device, "--batch", "32" if batching else "1", "--queue", "4096", "--cache-mib", "0"]
                        server = ServeProcess(ckpt, options + (["--bf16"] if args.bf16 else [])).__enter__()
                    try:
                        for clients in args.clients:
                            if mode == "http":
                                row = measure_http(server, clients, batching, args, args.device)
                            else:
                                row = measure_in_process(model, dtype, clients, batching, args, args.device)
                            tiles.append(row)
                            console.print(f"  {mode:>10} batching {row['batching']:>3} {clients:>3} clients: {row['tiles_per_s']:.1f} tiles/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms")
                            save()
                    finally:
                        if server is not None:
                            server.__exit__(None, None, None)
    if not args.no_export:
        del model
        for size in args.export_sizes:
            row = measure_export(spec, args.export_width, size, args)
            exports.append(row)
            console.print(f"  export {row['size']}: " + (f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB" if "seconds" in row else row.get("note", "")))
            save()
    save()
    run.table(f"Tiles — {model_text}", TILE_COLUMNS, tiles)
    run.table("Export (tiled pyramidal BigTIFF, deflate)", EXPORT_COLUMNS, exports)
    run.goals(check_goals(args.device, tiles, exports))
    run.done()


if __name__ == "__main__":
    main()
