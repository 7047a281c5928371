"""Turn benchmark JSON lines into the markdown table that docs/benchmarks.md holds.

Usage: ``python -m benchmarks.table results.jsonl [--run RUN_ID | --all]`` (default: the last run in the file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            records.append(json.loads(line))
    return records


def _describe(record: dict[str, Any]) -> str:
    s = record.get("settings", {})
    what = record["what"]
    if what == "train_profile":
        return f"latent cache {'on' if s.get('latent_cache') else 'off'}, {s.get('profiled_steps')} profiled steps"
    if what.startswith("train"):
        if "batch" in s and "latent_cache" in s:
            switches = "".join(
                [
                    ", channels-last" if s.get("channels_last") else "",
                    f", compile {s['compile']}" if s.get("compile") else "",
                    _graph_step(record),
                ]
            )
            return (
                f"{s['batch']} images at {s['resolution']}², rank {s['rank']}, text-encoder LoRA, "
                f"latent cache {'on' if s['latent_cache'] else 'off'}{switches}, {s['timed_steps']} timed steps"
            )
        return f"{s.get('batch', '')} images, rank {s.get('rank', '')}"
    if what.startswith("edit"):
        ages = s.get("ages", [])
        parts = ([f"{len(ages)} ages"] if ages else []) + [f"{s.get('ddim_steps')} steps"]
        if "mode" in s:
            parts.append(s["mode"])
        if (s.get("mode") == "null-text" or what == "edit_inversion_speedup") and "inner_steps" in s:
            parts.append(f"≤{s.get('inner_steps')} inner")
        if "max_batch" in s:
            parts.append(f"max_batch {s['max_batch'] or 'all'}")
        if s.get("compile_inversion"):
            parts.append("compiled inversion")
        if s.get("cuda_graph") is False and record.get("device_type") == "cuda":
            parts.append("inversion without CUDA graphs")
        if s.get("lora_applied") not in (None, "none"):
            parts.append(f"LoRA {s['lora_applied']}")
        return ", ".join(parts)
    if what.startswith("lora_effect"):
        head = s.get("candidate") or s.get("train_dtype") or s.get("precision") or ""
        if what == "lora_effect_inner_step":
            return f"{head}, null-text inner step (UNet forward + backward, batch 1) with vs without the LoRA"
        ages = ",".join(str(a) for a in s.get("ages", []))
        train = f"LoRA {s.get('train_steps')} steps at lr {s.get('lr')}, rank {s.get('rank')}"
        return f"{head + ': ' if head else ''}{train}; ages {ages}, {s.get('ddim_steps')} steps, ≤{s.get('inner_steps')} inner"
    if what.startswith("command_"):
        return ", ".join(f"{k} {v}" for k, v in s.items() if k != "ages") + (
            f", {len(s['ages'])} ages" if s.get("ages") else ""
        )
    if what.startswith("align") and "size" in s:
        how = "one process" if s.get("mode") == "single" else f"pool of {s.get('workers')} (start-up included)"
        return f"{s['size']} JPEG → {s.get('output_size')}² PNG, {s.get('detector')}, {how}, {s.get('photos')} photos"
    return ", ".join(f"{k} {v}" for k, v in s.items())


def _graph_step(record: dict[str, Any]) -> str:
    """How a train_step line asked for and got ``--cuda-graph`` (refused off a GPU: no runner); on a
    GPU, a line measured with ``--no-cuda-graph`` (the trainer's default there is the graph) says so."""
    settings = record.get("settings", {})
    if not settings.get("cuda_graph"):
        eager_on_gpu = settings.get("cuda_graph") is False and record.get("device_type") == "cuda"
        return ", eager step (--no-cuda-graph)" if eager_on_gpu else ""
    return ", CUDA-graph step" if record.get("step_runner") else ", --cuda-graph refused"


def _extra(record: dict[str, Any]) -> str:
    keys = (
        "unet_runner",
        "graph_differences",
        "graph_eager_noise",
        "step_runner",
        "graph_loss_difference",
        "graph_failure",
        "inner_steps_run",
        "unet_calls",
        "reconstruction_psnr",
        "reconstruction_latent_rmse",
        "ratio",
        "speedup",
        "warmup_seconds",
        "device_kernel_seconds_per_step",
        "device_busy_share",
        "eager_seconds",
        "graph_seconds",
        "max_abs_null_embedding_difference",
        "max_abs_x_t_difference",
        "seconds_per_photo",
        "photos",
        "reason",
        "lora_applied",
        "r_image",
        "r_latent",
        "max_r",
        "meets_goal",
        "passing",
        "auto",
        "without_lora_seconds",
        "max_abs_latent_difference",
        "max_relative_loss_difference",
        "max_relative_weight_difference",
        "repeat_seconds",
        "exit_codes",
        "setup_seconds",
        "peak_memory_gib",
        "skipped",
        "error",
    )
    out = []
    for key in keys:
        if key in record and record[key] not in (None, {}):
            value = record[key]
            if isinstance(value, float):
                value = _number(value)
            elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                value = "[" + ", ".join(_number(float(v)) if isinstance(v, float) else str(v) for v in value) + "]"
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = ", ".join(value)
            elif isinstance(value, dict):
                value = "(" + ", ".join(f"{k} {_number(float(v))}" for k, v in value.items()) + ")"
            out.append(f"{key.replace('_', ' ')} {value}")
    return "; ".join(out)


def _number(value: float) -> str:
    """Two decimals, or two significant digits in e-notation for tiny non-zero values (differences)."""
    return f"{value:.2e}" if value and abs(value) < 0.01 else f"{value:.2f}"


def _seconds(record: dict[str, Any]) -> str:
    if "seconds" not in record:
        return "–"
    text = f"{record['seconds']:.3f}"
    if "p10" in record:
        text += f" ({record['p10']:.3f}–{record['p90']:.3f})"
    return text


def _memory(record: dict[str, Any]) -> str:
    if "peak_memory_bytes" not in record:
        return "–"
    gib = record["peak_memory_bytes"] / 2**30
    kind = "GPU" if record.get("peak_memory_kind", "").startswith("cuda") else "RSS"
    return f"{gib:.2f} GiB {kind}"


def render(records: list[dict[str, Any]]) -> str:
    """A markdown table (what, settings, median seconds (p10–p90), extra figures, peak memory)."""
    if not records:
        return "(no measurements)\n"
    first = records[0]
    loads = [r["load_average_1min"] for r in records if r.get("load_average_1min") is not None]
    load = f"; 1-min load average {min(loads):.1f}–{max(loads):.1f}" if loads else ""
    threads = f"; {first['threads']} torch thread(s)" if first.get("threads") else ""
    lines = [
        f"Device: {first.get('device')}; model {first.get('model')}; dtype {first.get('dtype')}; "
        f"torch {first.get('torch')}{threads}{load}; git {first.get('git')}; run {first.get('run_id')} "
        f"({first.get('timestamp')}).",
        "",
        "| what | settings | seconds, median (p10–p90) | figures | peak memory |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['what']} | {_describe(r)} | {_seconds(r)} | {_extra(r)} | {_memory(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--run", default=None, help="only this run_id (default: the last run in the file)")
    parser.add_argument("--all", action="store_true", help="every run in the file")
    args = parser.parse_args(argv)
    records = read_records(args.results) if args.results.exists() else []
    if not args.all and records:
        run = args.run or records[-1].get("run_id")
        records = [r for r in records if r.get("run_id") == run]
    print(render(records), end="")


if __name__ == "__main__":
    main()
