"""The machine infd runs on: its CPU and GPUs, whether bfloat16 is fast here, and the C allocator's setting.

    system.cpu_info()                      # CpuInfo(model="AMD EPYC", flags=frozenset({...}))
    system.vector_extensions()             # ["avx2"]: what the CPU has of VECTOR_FLAGS
    system.fast_bf16(torch.device("cpu"))  # False: bfloat16 convolutions are emulated here
    system.tune_allocator()                # once per process (`infd.rendering` does it on import)

`infd doctor`, the benchmarks' machine records and the precision of every render read the
machine here, so a bug report, a timing and a render all describe the same CPU.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import sys
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------- CPU

# The x86 vector instructions that decide how fast a render is (as /proc/cpuinfo names them).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
# Those that make bfloat16 convolutions native: without them oneDNN converts every value
# to float32 and back, and a bfloat16 render is many times slower than a float32 one (a 512²
# tile of the shipped model on an AVX2-only EPYC: 3.8 s against 0.28 s).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "AMD EPYC 7B13", or the architecture when the OS does not say
    flags: frozenset[str]  # instruction-set flags; empty when unknown (not Linux)


@functools.cache
def cpu_info() -> CpuInfo:
    """This CPU's model name and flags, from /proc/cpuinfo (Linux); elsewhere the platform's name and no flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return CpuInfo(platform.processor() or platform.machine(), frozenset())
    fields: dict[str, str] = {}
    for line in lines:  # the first CPU's fields; every core of a machine reports the same
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""  # x86 / ARM
    return CpuInfo(fields.get("model name") or platform.processor() or platform.machine(), frozenset(flags.split()))


def vector_extensions() -> list[str]:
    """The VECTOR_FLAGS this CPU has, in that order (e.g. ["avx2", "fma"])."""
    flags = cpu_info().flags
    return [flag for flag in VECTOR_FLAGS if flag in flags]


def mkldnn_bf16_supported() -> bool:
    """Whether oneDNN (torch's CPU convolutions) runs bfloat16 natively on this CPU; False when torch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 convolutions are faster than float32 ones on `device`.

    CUDA: GPUs with native bfloat16 (compute capability 8.0 and later). CPU: the bfloat16
    instructions of BF16_CPU_FLAGS, or oneDNN saying it runs bfloat16 natively. Elsewhere
    (an AVX2-only CPU, MPS) False: there bfloat16 only loses precision.
    """
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation (and counts only native support)
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_info().flags for flag in BF16_CPU_FLAGS) or mkldnn_bf16_supported()
    return False


# ---------------------------------------------------------------- GPUs


def gpus() -> list[dict]:
    """Every CUDA GPU torch sees: [{"name", "memory_gib", "capability"}]; [] when none."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"})
    return found


# ---------------------------------------------------------------- the C allocator

# Why: a render runs tile after tile, and each tile's buffers (a 512² tile of the shipped
# model: the query layout and each conv's output, 35-45 MB apiece) are above glibc's
# largest mmap threshold (32 MiB). So every tile maps fresh pages and page-faults them in
# (about 590,000 minor faults per 1024² render), and unmaps them when it is done: more than
# half the time of a 2048² float32 render on 2 cores (8.3 s -> 4.0 s with this setting, an
# AVX2 EPYC). Served from the heap, and the heap not trimmed between tiles, the next tile
# reuses the same pages; the peak RSS grows by about 5% (1.01 -> 1.05 GB for that render,
# most of it torch itself), and the process keeps up to MALLOC_TRIM_BYTES of freed memory
# for its next render. Larger blocks (an 8192² output, 800 MB) are still mapped and
# returned when freed. `benchmarks/render.py --allocator` measures both.
MALLOC_TUNING_ENV = "INFD_MALLOC_TUNING"  # "0" (or false, no, off) leaves the allocator as it is
MALLOC_MMAP_THRESHOLD_BYTES = 256 * 2**20  # blocks below come from the heap (glibc: 128 KiB, growing to at most 32 MiB)
MALLOC_TRIM_BYTES = 1024 * 2**20  # free memory above the heap's top returned to the OS beyond this (glibc: 128 KiB)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_allocator_state: str | None = None  # what tune_allocator did, once per process


def tune_allocator() -> str:
    """Keep freed memory for reuse (glibc `mallopt`, see MALLOC_MMAP_THRESHOLD_BYTES) once per process; returns what it did.

    "tuned"; "off (INFD_MALLOC_TUNING=0)"; or "not glibc" (macOS, Windows, musl: those
    allocators need nothing, or offer no such setting). Idempotent and safe to call from
    any thread: later calls return the first call's result without touching anything.
    """
    global _allocator_state
    if _allocator_state is None:
        _allocator_state = _apply_malloc_tuning()
    return _allocator_state


def _apply_malloc_tuning() -> str:
    if os.environ.get(MALLOC_TUNING_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off ({MALLOC_TUNING_ENV}={os.environ[MALLOC_TUNING_ENV]})"
    if not sys.platform.startswith("linux") or not _glibc_version():
        return "not glibc"
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES)
    return "tuned" if done else "refused by glibc"


def _glibc_version() -> str | None:
    """The glibc version ("2.36"), or None under another C library."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (ValueError, OSError, AttributeError):
        return None
    return version if name == "glibc" else None


def allocator_description() -> str:
    """One line on the allocator setting, for `infd doctor` and the benchmarks' machine records."""
    state = tune_allocator()
    if state != "tuned":
        return state
    return f"tuned (glibc {_glibc_version()}: heap below {MALLOC_MMAP_THRESHOLD_BYTES // 2**20} MiB, trim above {MALLOC_TRIM_BYTES // 2**20} MiB; {MALLOC_TUNING_ENV}=0 turns it off)"


# ---------------------------------------------------------------- the record of a measurement


def machine_record(device: torch.device) -> dict:
    """What a measurement ran on, for its JSON: date, CPU and its vector instructions, fast bf16, the allocator,
    cores, threads, load, python, torch and its CPU kernels, and the GPU (with its cuDNN/TF32 settings) on CUDA."""
    info = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=device.type,
        cpu=cpu_info().model,
        cpu_flags=vector_extensions(),
        bf16_fast=fast_bf16(device),
        allocator=tune_allocator(),
        cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        torch_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        python=platform.python_version(),
        torch=torch.__version__,
        mkldnn=torch.backends.mkldnn.is_available(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark)
        info.update(cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info
