"""Timing and reporting shared by every benchmark: one JSON line per measurement.

Each measurement is printed as ONE JSON line on stdout the moment it is made (flushed) and
appended to a results file (JSON Lines), so a run cut short still leaves every figure it measured.
A line holds: ``what``, ``model``, ``device`` (the device's name: ``torch.cuda.get_device_name`` or
the CPU model from ``/proc/cpuinfo`` with the thread count), ``dtype``, ``settings``, ``seconds``
(the median of the timed repeats after the warm-up), ``p10``/``p90`` (when repeated more than
once), ``repeats``, ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated`` since the
measurement started on a GPU; the process's ``ru_maxrss`` high-water mark on the CPU, which
never goes down) and ``peak_memory_kind``, plus extra keys of the measurement itself.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or platform), with the number of cores torch uses."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} cores)"


def device_name(device: torch.device | str) -> str:
    """Human name of the device measurements run on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_name()


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timing_stats(samples: list[float]) -> dict[str, Any]:
    """``seconds`` (median), and ``p10``/``p90`` when there is more than one sample."""
    stats: dict[str, Any] = {"seconds": statistics.median(samples), "repeats": len(samples)}
    if len(samples) > 1:
        stats["p10"] = percentile(samples, 10)
        stats["p90"] = percentile(samples, 90)
    return stats


class PeakMemory:
    """Peak memory over a span: CUDA max allocated (reset at the start) or the process's ru_maxrss."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            synchronize(self.device)
            return {
                "peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "peak_memory_kind": "cuda_max_memory_allocated",
            }
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"peak_memory_bytes": int(rss_kib) * 1024, "peak_memory_kind": "process_ru_maxrss"}


def time_call(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """Seconds taken by ``fn()`` (device synchronised before and after), and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def repeat_timed(
    fn: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int = 1
) -> tuple[list[float], Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; (samples, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    samples: list[float] = []
    for _ in range(max(1, repeats)):
        seconds, result = time_call(fn, device)
        samples.append(seconds)
    return samples, result


def git_revision() -> str | None:
    """The repository's commit (with ``+dirty`` when the tree has changes), if git is available."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


@dataclass
class Recorder:
    """Prints each measurement as one JSON line (flushed) and appends it to ``out`` (JSON Lines)."""

    model: str
    device: torch.device
    dtype: str
    out: Path | None = None
    common: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.common = {
            "device_name": device_name(self.device),
            "run_id": os.environ.get("BENCH_RUN_ID") or time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "python": platform.python_version(),
            "git": git_revision(),
            **self.common,
        }
        if self.out is not None:
            self.out = Path(self.out)
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(
        self,
        what: str,
        settings: dict[str, Any],
        samples: list[float] | None = None,
        memory: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Record one measurement: print it now, append it to the results file, keep it."""
        record: dict[str, Any] = {
            "what": what,
            "model": self.model,
            "device": self.common["device_name"],
            "device_type": self.device.type,
            "dtype": self.dtype,
            "settings": settings,
        }
        if samples:
            record.update(timing_stats(samples))
        record.update(memory or {})
        record.update(extra)
        record.update({k: v for k, v in self.common.items() if k != "device_name"})
        if self.device.type == "cpu" and hasattr(os, "getloadavg"):
            record["load_average_1min"] = round(os.getloadavg()[0], 2)  # CPU figures depend on other jobs
        record["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        line = json.dumps(record, default=str)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if self.out is not None:
            with open(self.out, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        self.records.append(record)
        return record


@contextmanager
def measuring_memory(device: torch.device | str):
    """``with measuring_memory(dev) as peak: ...; peak.read()`` — resets the CUDA peak first."""
    peak = PeakMemory(device)
    peak.reset()
    yield peak
