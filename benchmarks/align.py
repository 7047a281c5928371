"""Benchmark of ``selfage align``: seconds per photo for 1 MP and 12 MP photos, single process and pooled.

Synthetic photos: the packaged Grace Hopper portrait pasted, upscaled, onto a canvas of the requested
size (a face about a quarter of the photo's height, as in a phone portrait), saved as JPEG (quality 90),
so each measurement includes decoding, detection on the downscaled copy, landmarks, the FFHQ warp to
512² and PNG encoding (the work of one ``selfage align`` worker; the manifest update is negligible).

Run: ``python -m benchmarks.align [--sizes 1MP,12MP] [--photos 4] [--no-pool]``. Each measurement is
printed as one JSON line and returned by :func:`bench_align`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

SIZES = {"1MP": (1152, 864), "12MP": (4000, 3000), "48MP": (8000, 6000)}


def make_photo(size: tuple[int, int], path: Path, seed: int = 0) -> Path:
    """A JPEG of ``size`` with one real face (Grace Hopper) filling about a quarter of its height."""
    import numpy as np
    from PIL import Image

    portrait = Image.open(Path(str(resources.files("selfage_cli") / "data" / "faces" / "grace_hopper.jpg")))
    portrait = portrait.convert("RGB")
    width, height = size
    scale = height * 0.45 / portrait.height
    face = portrait.resize((round(portrait.width * scale), round(portrait.height * scale)), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    # A vertical colour gradient built in uint8 (no float copy of a 12-48 MP canvas).
    ramp = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    tint = [int(v) for v in rng.integers(60, 160, 3)]
    canvas = Image.merge("RGB", [ramp.point(lambda x, t=t: t // 2 + x * t // 510) for t in tint])
    canvas.paste(face, (int(width * (0.25 + 0.3 * rng.random())), int(height * 0.3)))
    canvas.save(path, quality=90)
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``/proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset (VmHWM), else since start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def bench_align(
    sizes: tuple[str, ...] | list[str] = ("1MP", "12MP"),
    pooled: bool = True,
    photos: int = 4,
    workers: int = 0,
    print_lines: bool = True,
) -> list[dict[str, Any]]:
    """Seconds per photo per size: ``single`` (one process, models loaded, median of ``photos`` runs after a
    warm-up; ``peak_rss_mb``: the process's peak resident memory while aligning them, models included)
    and ``pooled`` (``photos`` photos through the stage's process pool, wall time / photos, worker
    start-up and model loading included)."""
    from selfage_cli.faces.engine import dlib_models
    from selfage_cli.faces.stage import AlignJob, _run_jobs, _workers, run_job

    results: list[dict[str, Any]] = []
    n_workers = _workers(workers or (os.cpu_count() or 1), photos)
    common = {"what": "align", "device": _cpu_name(), "cpus": os.cpu_count(), "output_size": 512, "detector": "hog"}
    with tempfile.TemporaryDirectory(prefix="selfage-bench-align-") as tmp:
        for label in sizes:
            if label not in SIZES:
                raise ValueError(f"unknown size {label!r}; choose from {', '.join(SIZES)}")
            paths = [make_photo(SIZES[label], Path(tmp) / f"{label}_{i}.jpg", seed=i) for i in range(photos)]
            jobs = [
                AlignJob(source=str(p), size=512, detector="hog", all_faces=False, descriptors=False) for p in paths
            ]
            dlib_models.preload("hog")
            warm = run_job(jobs[0])
            if warm.error:
                raise RuntimeError(f"benchmark photo failed to align: {warm.error}")
            times = []
            _reset_peak_rss()
            for job in jobs:
                start = time.perf_counter()
                outcome = run_job(job)
                times.append(time.perf_counter() - start)
                if outcome.error:
                    raise RuntimeError(outcome.error)
            record = {
                **common,
                "size": label,
                "pixels": SIZES[label][0] * SIZES[label][1],
                "mode": "single",
                "workers": 1,
                "photos": photos,
                "seconds_per_photo": round(statistics.median(times), 3),
                "peak_rss_mb": _peak_rss_mb(),
            }
            results.append(record)
            if print_lines:
                print(json.dumps(record), flush=True)
            if pooled and n_workers > 1:
                done: list[Any] = []
                start = time.perf_counter()
                _run_jobs(jobs, n_workers, done.append)
                wall = time.perf_counter() - start
                failed = [r.error for r in done if r.error]
                if failed:
                    raise RuntimeError(failed[0])
                record = {
                    **common,
                    "size": label,
                    "pixels": SIZES[label][0] * SIZES[label][1],
                    "mode": "pooled",
                    "workers": n_workers,
                    "photos": photos,
                    "seconds_per_photo": round(wall / photos, 3),
                    # Largest worker's peak resident memory (VmHWM, models included).
                    "peak_rss_mb_worker": max((r.peak_rss_mb or 0.0) for r in done),
                }
                results.append(record)
                if print_lines:
                    print(json.dumps(record), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1MP,12MP", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--photos", type=int, default=4, help="photos per size (default 4)")
    parser.add_argument("--workers", type=int, default=0, help="pool size (0: one per core)")
    parser.add_argument("--no-pool", action="store_true", help="single process only")
    args = parser.parse_args(argv)
    bench_align(
        tuple(s.strip() for s in args.sizes.split(",") if s.strip()),
        pooled=not args.no_pool,
        photos=args.photos,
        workers=args.workers,
    )


if __name__ == "__main__":
    main()
