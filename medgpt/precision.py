"""bf16 on a CPU: does this processor run bf16 matmuls fast, and which dtype do our scripts load and train in.

CPUs differ by two orders of magnitude here. With AVX512-BF16 or AMX-BF16 (Intel Xeon from Cooper Lake/Sapphire
Rapids on, AMD EPYC from Zen 4 on) oneDNN runs a bf16 matmul 4-7x faster than fp32 (measured: 450-960 vs 100-210
GFLOP/s on 2 threads). Without them torch emulates bf16 and the same matmul runs ~300x *slower* than fp32
(0.2 vs 67 GFLOP/s, an AVX2-only EPYC). So the rule is not "CPU bf16 is slow": it is "use bf16 on a CPU with native
bf16, fp32 elsewhere", and that is decided here once per machine: the CPU's flags (/proc/cpuinfo) must name a bf16
instruction set and a short timed matmul (~0.2 s) must confirm bf16 is at least `MIN_SPEEDUP` times as fast as fp32.
The verdict is cached in the model cache folder (~/.cache/medgpt/cpu_bf16.json), keyed by CPU model, flags, torch
version and thread count. `MEDGPT_CPU_BF16=0` (or 1) overrides the check, e.g. to simulate a CPU without bf16.

Hand-written because torch only reports what oneDNN *can* run (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is
true on AVX512-only CPUs where bf16 runs at a fraction of fp32 speed) and transformers' `is_torch_bf16_cpu_available`
only checks the torch version.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from functools import lru_cache
from typing import Optional

import torch

logger = logging.getLogger(__name__)

MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this factor: native bf16 gives 4-7x, emulated bf16 0.003x
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX / AVX512-BF16, Arm's BF16 extension (Graviton 3, ...)
ENV = "MEDGPT_CPU_BF16"


@dataclasses.dataclass
class CpuBf16:
    fast: bool
    reason: str  # one line: why bf16 is (not) used on this CPU
    cpu: str = ""
    flags: tuple = ()
    fp32_gflops: Optional[float] = None
    bf16_gflops: Optional[float] = None


def _cpu_info() -> tuple[str, tuple]:
    """(CPU model name, its bf16 flags) from /proc/cpuinfo (Linux); ("", ()) where there is none."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name":
                    name = value.strip()
                elif key in ("flags", "features"):  # x86 / Arm
                    flags.update(value.split())
                if key == "processor" and flags:
                    break  # one core's flags are every core's
    except OSError:
        return name, ()
    return name, tuple(f for f in BF16_FLAGS if f in flags)


def _matmul_gflops(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, seconds: float = 0.08) -> float:
    """Best GFLOP/s of an [m, k] x [k, n] matmul (SmolLM2's MLP shape) in `dtype` over ~`seconds`."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up: oneDNN picks and JIT-compiles its kernel here
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        if best > seconds:  # emulated bf16: one product is already slow enough to decide
            break
    return 2 * m * k * n / best / 1e9


def _cache_path() -> str:
    from .default_model import cache_root
    return os.path.join(str(cache_root()), "cpu_bf16.json")


def _measure(cpu: str, flags: tuple) -> CpuBf16:
    key = f"{cpu}|{','.join(flags)}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    path = _cache_path()
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f).get(key)
        if cached:
            return CpuBf16(**{**cached, "flags": tuple(cached["flags"])})
    except (OSError, ValueError, TypeError):
        pass
    fp32, bf16 = _matmul_gflops(torch.float32), _matmul_gflops(torch.bfloat16)
    fast = bf16 >= MIN_SPEEDUP * fp32
    reason = (f"{cpu or 'this CPU'} ({', '.join(flags)}): bf16 matmul {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} "
              f"({bf16 / fp32:.1f}x)")
    result = CpuBf16(fast, reason, cpu, flags, round(fp32, 1), round(bf16, 1))
    try:  # cache it (several processes may write at once: write a temporary file, then rename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        table[key] = dataclasses.asdict(result)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("could not cache the CPU bf16 check in %s: %s", path, e)
    return result


@lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """Whether this CPU runs bf16 matmuls fast (see the module docstring), with the reason in one line."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return CpuBf16(False, f"{ENV}={os.environ[ENV]} says this CPU has no fast bf16")
    if forced in ("1", "true", "yes", "on"):
        return CpuBf16(True, f"{ENV}={os.environ[ENV]} says this CPU has fast bf16")
    cpu, flags = _cpu_info()
    if not flags and os.path.exists("/proc/cpuinfo"):
        return CpuBf16(False, f"{cpu or 'this CPU'} has no native bf16 (no avx512_bf16, amx_bf16 or bf16 among its "
                              "flags): bf16 matmuls would be emulated, ~300x slower than fp32", cpu)
    result = _measure(cpu, flags)
    if not result.fast:
        result.reason += f", less than the {MIN_SPEEDUP}x that pays for bf16"
    return result


def half_precision_on_cpu(requested: str) -> Optional[torch.dtype]:
    """What a request for half precision (`requested`: "bfloat16", "float16", "--bf16", ...) becomes on a machine
    without CUDA: torch.bfloat16 where the CPU has fast bf16 (fp16 too: CPUs have no fast fp16 matmul), else None
    (float32). Logs the decision and its measured reason once per request kind."""
    check = cpu_bf16()
    _log_decision(requested, check.fast, check.reason)
    return torch.bfloat16 if check.fast else None


@lru_cache(maxsize=None)
def _log_decision(requested: str, fast: bool, reason: str) -> None:
    if fast:
        logger.info("%s on a CPU with native bf16 -> bfloat16 (%s).", requested, reason)
    else:
        logger.warning("%s on this CPU -> float32: %s.", requested, reason)
