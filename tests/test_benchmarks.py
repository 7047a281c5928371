"""Benchmark suite: the harness's JSON lines, and ``benchmarks/gpu.sh --dry-run`` end to end.

The dry run is the smoke test of the tiny benchmark run: it runs ``python -m benchmarks --model
tiny`` (train with and without the latent cache, edit in the three inversion modes, batched and naive)
with tiny settings on the CPU. Timings are not asserted, only that every measurement is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives at the repository root, beside tests/
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, table  # noqa: E402
from benchmarks.install_wheels import missing_wheels, wheel_distribution, wheel_version  # noqa: E402

REQUIRED = ("what", "model", "device", "dtype", "settings", "run_id", "timestamp")


def test_percentiles_and_stats() -> None:
    assert harness.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert harness.percentile([0.0, 10.0], 10) == pytest.approx(1.0)
    stats = harness.timing_stats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats == {"seconds": 3.0, "repeats": 5, "p10": pytest.approx(1.4), "p90": pytest.approx(4.6)}
    assert harness.timing_stats([2.5]) == {"seconds": 2.5, "repeats": 1}


def test_recorder_prints_each_line_and_appends_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "results.jsonl"
    out.parent.mkdir()
    out.write_text('{"what": "older"}\n')
    recorder = harness.Recorder(model="tiny", device="cpu", dtype="fp32", out=out)
    peak = harness.PeakMemory("cpu").read()
    recorder.emit("thing", {"n": 1}, [0.2, 0.1, 0.3], peak, extra=7)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 1
    record = printed[0]
    assert all(key in record for key in REQUIRED)
    assert record["seconds"] == pytest.approx(0.2) and record["p10"] < record["p90"]
    assert record["peak_memory_bytes"] > 10 * 2**20 and record["peak_memory_kind"] == "process_ru_maxrss"
    assert record["extra"] == 7 and "cores" in record["device"]
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"what": "older"} and json.loads(lines[1]) == record


def test_wheel_installer_picks_missing_distributions_and_other_versions(tmp_path: Path) -> None:
    import importlib.metadata

    assert wheel_distribution(Path("importlib_metadata-10.2.0-py3-none-any.whl")) == "importlib-metadata"
    assert wheel_distribution(Path("dlib_bin-20.0.1-cp312-cp312-manylinux_2_28_x86_64.whl")) == "dlib-bin"
    assert wheel_version(Path("dlib_bin-20.0.1.post1-cp312-cp312-manylinux_2_28_x86_64.whl")) == "20.0.1.post1"
    same = importlib.metadata.version("typer")
    folders = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for folder in folders.values():
        folder.mkdir()
    (folders["a"] / f"typer-{same}-py3-none-any.whl").write_bytes(b"")
    (folders["a"] / "surely_not_installed_pkg-1.0-py3-none-any.whl").write_bytes(b"")
    (folders["b"] / "typer-0.0.1-py3-none-any.whl").write_bytes(b"")
    todo, skipped = missing_wheels(folders["a"])
    assert [w.name for w in todo] == ["surely_not_installed_pkg-1.0-py3-none-any.whl"]
    assert [w.name for w in skipped] == [f"typer-{same}-py3-none-any.whl"]
    todo, skipped = missing_wheels(folders["b"])  # a pinned version unlike the installed one goes in
    assert [w.name for w in todo] == ["typer-0.0.1-py3-none-any.whl"] and skipped == []


def test_unknown_benchmark_is_refused() -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit, match="use align, train, edit, all"):
        main(["--what", "bogus"])


def test_table_renders_records() -> None:
    records = [
        {
            "what": "train_step",
            "model": "tiny",
            "device": "CPU",
            "dtype": "fp32",
            "run_id": "r",
            "settings": {"latent_cache": True, "batch": "4+4", "resolution": 128, "rank": 16, "timed_steps": 5},
            "seconds": 0.5,
            "p10": 0.4,
            "p90": 0.6,
            "peak_memory_bytes": 2**30,
            "peak_memory_kind": "cuda_x",
        },
        {
            "what": "edit_naive_loop",
            "model": "tiny",
            "device": "CPU",
            "dtype": "fp32",
            "run_id": "r",
            "settings": {"ages": [0, 40], "ddim_steps": 3, "mode": "null-text", "inner_steps": 2, "max_batch": 1},
            "seconds": 2.0,
            "ratio": 1.5,
            "unet_calls": 6,
        },
    ]
    text = table.render(records)
    assert (
        "| train_step | 4+4 images at 128², rank 16, text-encoder LoRA, latent cache on, 5 timed steps | "
        "0.500 (0.400–0.600) |  | 1.00 GiB GPU |" in text
    )
    assert "unet calls 6; ratio 1.50" in text and "2 ages, 3 steps, null-text, ≤2 inner, max_batch 1" in text


def test_table_names_the_cuda_graph_switches_as_they_ran() -> None:
    def line(what: str, device_type: str, settings: dict, **extra) -> str:
        record = {"what": what, "device_type": device_type, "run_id": "r", "seconds": 1.0, "settings": settings}
        return table.render([{**record, **extra}])

    edit = {"ages": [0], "ddim_steps": 3, "mode": "negative-prompt", "cuda_graph": False}
    assert "inversion without CUDA graphs" in line("edit_inversion", "cuda", edit)
    assert "without CUDA graphs" not in line("edit_inversion", "cpu", edit)  # never any on a CPU
    graphed = line(
        "edit_inversion",
        "cuda",
        {**edit, "cuda_graph": True},
        unet_runner="cuda-graph",
        graph_differences={"forward": 0.0, "forward + backward": 0.003},
    )
    assert "without CUDA graphs" not in graphed
    assert "unet runner cuda-graph; graph differences (forward 0.00, forward + backward 3.00e-03)" in graphed
    train = {"batch": "4+4", "resolution": 512, "rank": 16, "latent_cache": True, "timed_steps": 20, "cuda_graph": True}
    ran = line("train_step", "cuda", train, step_runner="cuda-graph", graph_loss_difference=0.0012)
    assert "latent cache on, CUDA-graph step, 20 timed steps" in ran
    assert "step runner cuda-graph; graph loss difference 1.20e-03" in ran
    assert "--cuda-graph refused" in line("train_step", "cpu", train, step_runner=None)
    eager = {**train, "cuda_graph": False}
    assert "latent cache on, eager step (--no-cuda-graph), 20 timed steps" in line("train_step", "cuda", eager)
    assert "eager step" not in line("train_step", "cpu", eager)  # a CPU has no other


def _run_gpu_sh(args: list[str], out: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=out.parent,
    )


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _run_gpu_sh(["--dry-run"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert printed == records  # every line printed as measured, and written to $OUT
    for record in records:
        assert all(key in record for key in REQUIRED), record
        assert record["model"] == "tiny" and record["device_type"] == "cpu"
    whats = [r["what"] for r in records]
    assert {r["settings"]["latent_cache"] for r in records if r["what"] == "train_step"} == {True, False}
    steps = [r for r in records if r["what"] == "train_step"]
    assert all(r["seconds"] > 0 and r["peak_memory_bytes"] > 0 and r["loss_finite"] for r in steps)
    assert "train_latent_cache_speedup" in whats
    inversions = {r["settings"]["mode"]: r for r in records if r["what"] == "edit_inversion"}
    assert set(inversions) == {"null-text", "negative-prompt", "direct"}
    assert 1 <= inversions["null-text"]["inner_steps_run"] <= 3 * 2
    assert inversions["negative-prompt"]["inner_steps_run"] == 0 == inversions["direct"]["inner_steps_run"]
    batched = [r for r in records if r["what"] == "edit_batched"]
    naive = [r for r in records if r["what"] == "edit_naive_loop"]
    assert len(batched) == 3 and len(naive) == 1 and whats.count("edit_whole") == 3
    # Each mode's reconstruction (its source branch against the photo); random weights rebuild little.
    wholes = {r["settings"]["mode"]: r for r in records if r["what"] == "edit_whole"}
    assert all(0 < r["reconstruction_psnr"] < 40 and -1 <= r["reconstruction_ssim"] <= 1 for r in wholes.values())
    assert (
        wholes["direct"]["reconstruction_latent_rmse"] < 1e-4 < wholes["negative-prompt"]["reconstruction_latent_rmse"]
    )
    assert batched[0]["unet_calls"] == 3 and naive[0]["unet_calls"] == 3 * 3  # 3 steps × 3 ages one by one
    assert naive[0]["ratio"] == pytest.approx(naive[0]["seconds"] / batched[0]["seconds"])
    ratio = next(r for r in records if r["what"] == "edit_batching_ratio")
    assert ratio["max_abs_latent_difference"] < 1e-3  # batched and per-age runs make the same edits
    assert "edit_inversion_speedup" in whats
    assert "| edit_naive_loop |" in (out / "results.md").read_text()
    assert "align skipped" in result.stderr


@pytest.mark.slow
def test_gpu_script_variants_dry_run(tmp_path: Path) -> None:
    """``--variants``: the graph check (eager on a CPU, so identical), the profiled and plain train steps."""
    out = tmp_path / "out"
    result = _run_gpu_sh(["--dry-run", "--variants"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    checks = [r for r in records if r["what"] == "edit_graph_check"]
    assert [c["settings"]["mode"] for c in checks] == ["null-text", "negative-prompt", "direct"]
    assert all(c["max_abs_null_embedding_difference"] == 0 and c["max_abs_x_t_difference"] == 0 for c in checks)
    assert all(r["settings"]["cuda_graph"] for r in records if r["what"] == "edit_inversion")
    assert all(r["unet_runner"] == "eager" for r in records if r["what"] == "edit_inversion")  # no GPU here
    assert [r["what"] for r in records].count("train_profile") == 2
    steps = [r for r in records if r["what"] == "train_step"]
    assert [(r["settings"]["latent_cache"], r["settings"]["cuda_graph"]) for r in steps] == [
        (True, False),
        (True, True),
    ]
    assert steps[0]["step_runner"] is None and steps[1]["step_runner"] is None  # --cuda-graph refused on a CPU
    assert "--cuda-graph does not work off a CUDA GPU" in result.stderr
    table = (out / "results.md").read_text()
    assert "| train_profile | latent cache on, 3 profiled steps |" in table
    assert "latent cache on, --cuda-graph refused, 1 timed steps |" in table


@pytest.mark.slow
def test_gpu_script_without_gpu_says_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = _run_gpu_sh([], tmp_path / "out", timeout=120)
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr and "--dry-run" in result.stderr
    bad = _run_gpu_sh(["--bogus"], tmp_path / "out", timeout=30)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


@pytest.mark.slow
def test_lora_effect_short_form(tmp_path: Path) -> None:
    """The lora_effect measurement in a short form: R computed and finite, the (a) repeat at R = 0,
    fused and unfused fp32 within 1e-5, R_train computed, the choice among the passing candidates."""
    import math

    import torch

    from benchmarks.__main__ import faces
    from benchmarks.lora_effect import bench_lora_effect
    from selfage_cli.models import build_random_pipeline

    recorder = harness.Recorder(model="tiny", device="cpu", dtype="fp32", out=tmp_path / "r.jsonl")
    records = bench_lora_effect(
        recorder,
        lambda: build_random_pipeline("tiny", seed=0, device="cpu", dtype=torch.float32),
        device=torch.device("cpu"),
        photo=faces()[0],
        faces=faces(),
        train_steps=2,
        lr=1e-6,
        steps=3,
        inner_steps=2,
        candidates=("bf16", "tf32"),
        inner_step_repeats=1,
    )
    by = {(r["what"], r["settings"].get("candidate")): r for r in records}
    assert by[("lora_effect", "fp32")]["lora_applied"] == "fused-fp32"
    assert all(n > 0 for n in by[("lora_effect", "fp32")]["lora_effect_norm"]["latent"])  # the LoRA changes the edit
    repeat = by[("lora_effect", "fp32 (repeat)")]
    assert repeat["r_image"] == [0.0, 0.0, 0.0] and repeat["r_latent"] == [0.0, 0.0, 0.0]
    branch = by[("lora_effect", "fp32-branch")]
    assert branch["lora_applied"] == "branch-fp32" and branch["max_abs_latent_difference"] <= 1e-5
    bf16 = by[("lora_effect", "bf16")]
    assert bf16["lora_applied"] == "branch-bf16" and len(bf16["r_image"]) == 3
    assert all(math.isfinite(r) and r > 0 for r in bf16["r_image"] + bf16["r_latent"])
    assert "only on CUDA" in by[("lora_effect", "tf32")]["skipped"]  # no TF32 on a CPU
    choice = by[("lora_effect_choice", None)]
    assert choice["auto"] in choice["passing"] and "fp32" in choice["passing"]
    train = by[("lora_effect_train", None)]
    assert all(math.isfinite(r) for r in train["r_image"] + train["r_latent"])
    trainings = [r for r in records if r["what"] == "lora_effect_training"]
    assert [r["settings"]["train_dtype"] for r in trainings] == ["fp32", "bf16"] and all(
        r["loss_finite"] for r in trainings
    )
    assert by[("lora_effect_inner_step", None)]["ratio"] > 0


@pytest.mark.slow
def test_gpu_script_real_path_dry_run(tmp_path: Path) -> None:
    """``--real-path``: the 9-age edit with a LoRA loaded (its application in every edit line), the
    lora_effect measurement (no TF32 on a CPU: said so) and the graphed-vs-eager training check."""
    out = tmp_path / "out"
    result = _run_gpu_sh(["--dry-run", "--real-path"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    edits = [r for r in records if r["what"].startswith("edit_")]
    assert edits and all(r["settings"]["lora_applied"] == "fused-fp32" for r in edits)
    effect = {r["settings"].get("candidate"): r for r in records if r["what"] == "lora_effect"}
    assert effect["fp32 (repeat)"]["max_r"] == 0.0 and "only on CUDA" in effect["tf32"]["skipped"]
    assert effect["fp32-branch"]["max_abs_latent_difference"] <= 1e-5
    assert next(r for r in records if r["what"] == "lora_effect_choice")["auto"] == "fp32"
    check = next(r for r in records if r["what"] == "train_graph_check")
    assert check["max_relative_loss_difference"] == 0.0 and check["max_relative_weight_difference"] == 0.0
    assert "| lora_effect_choice |" in (out / "results.md").read_text()


def test_command_timing_reports_each_repeat_and_the_peak_in_gib(tmp_path: Path) -> None:
    """benchmarks/commands.py runs a selfage command in its own process: wall seconds per repeat (median
    as ``seconds``), exit codes, and the peak memory the process reported, in GiB."""
    from benchmarks.commands import _emit, run_command

    runs = [run_command(["--help"], cwd=tmp_path) for _ in range(3)]
    assert all(r["exit_code"] == 0 and r["seconds"] > 0 and r["peak_rss_bytes"] > 2**20 for r in runs)
    recorder = harness.Recorder(model="tiny", device="cpu", dtype="fp32", out=None)
    record = _emit(recorder, "command_help", {}, runs)
    assert record["repeats"] == 3 and sorted(record["repeat_seconds"])[1] == record["seconds"]
    assert record["peak_memory_gib"] == round(record["peak_memory_bytes"] / 2**30, 3)
    assert record["peak_memory_kind"] == "process_ru_maxrss" and record["exit_codes"] == [0, 0, 0]
    bad = run_command(["edit", "--bogus-option"], cwd=tmp_path)
    assert bad["exit_code"] == 2 and "bogus" in bad["stderr_tail"]
