"""``python -m benchmarks``: run the benchmark suite, one JSON line per measurement.

Examples::

    python -m benchmarks --model tiny --what all                      # CPU, a few minutes
    python -m benchmarks --model sd15 --what train,edit --device cuda --out results.jsonl
    python -m benchmarks --model tiny --what edit --ddim-steps 10 --inner-steps 3 --ages 0,40,80

Every line is printed (flushed) as soon as it is measured and appended to ``--out``.
See docs/benchmarks.md for what each line means and the figures to beat.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from selfage_cli.train.config import COMPILE_MODES  # light: imports no torch

WHATS = ("align", "train", "edit")
EXTRA_WHATS = ("lora_effect", "train_graph_check", "commands")  # not part of "all": long, or GPU-only in substance
DEFAULT_AGES = "0,10,20,30,40,50,60,70,80"


def faces() -> list[Path]:
    """The two packaged public-domain portraits (astronaut first)."""
    from importlib import resources

    folder = Path(str(resources.files("selfage_cli") / "data" / "faces"))
    return [folder / "astronaut.png", folder / "grace_hopper.jpg"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny", help="random pipeline architecture")
    parser.add_argument("--what", default="all", help="align, train, edit, all, or a comma list (default all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="train: as `train --dtype` (auto: bf16/fp16 on GPU, fp32 on CPU); edit: as `edit --dtype` (auto: fp32; "
        "also tf32, bf16, bf16-lora32, bf16-fused, fp16, fp16-vae32)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results.jsonl",
        help="results file (JSON Lines, appended; default benchmarks/results.jsonl, git-ignored)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed repeats of each edit measurement (after a short warm-up); align uses it too",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random pipeline")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a CPU shared with other jobs)",
    )
    train = parser.add_argument_group("train")
    train.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="timed steps per latent-cache mode (default 20 on sd15, 5 on tiny)",
    )
    train.add_argument("--train-warmup", type=int, default=2, help="untimed steps first (default 2)")
    train.add_argument("--train-batch", type=int, default=4, help="reference (= regularisation) images per step")
    train.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    train.add_argument(
        "--train-compile",
        default="off",
        choices=("off", *COMPILE_MODES),
        help="torch.compile mode of the trainer's UNet (default off)",
    )
    train.add_argument(
        "--train-cache-modes",
        default="on,off",
        help="latent-cache modes to time: on,off (default), on or off",
    )
    train.add_argument(
        "--train-profile", type=int, default=0, help="profile this many extra steps per mode (train_profile line)"
    )
    train.add_argument(
        "--train-graph",
        choices=("on", "off"),
        default="off",
        help="on: the trainer's --cuda-graph (each step replayed from one CUDA graph, its default on a GPU); off: --no-cuda-graph, the eager step (default off: the baseline)",
    )
    edit = parser.add_argument_group("edit")
    edit.add_argument("--ages", default=DEFAULT_AGES, help=f"target ages (default {DEFAULT_AGES})")
    edit.add_argument("--source-age", type=int, default=35, help="age in the inversion prompt (default 35)")
    edit.add_argument("--ddim-steps", type=int, default=50)
    edit.add_argument("--inner-steps", type=int, default=10, help="null-text inner steps per timestep")
    edit.add_argument("--guidance", type=float, default=7.5)
    edit.add_argument("--modes", default="null-text,negative-prompt,direct", help="inversion modes to measure")
    edit.add_argument(
        "--naive-modes",
        default=None,
        help="modes in which the naive per-age loop also runs (default: the first of --modes; 'all' or 'none')",
    )
    edit.add_argument("--no-warmup", action="store_true", help="skip the short warm-up edit (dry runs)")
    edit.add_argument(
        "--compile-inversion",
        action="store_true",
        help="run the inversion's UNet through torch.compile (mode reduce-overhead: CUDA graphs on a GPU);"
        " the warm-up then includes compiling, reported as edit_compile_warmup",
    )
    edit.add_argument("--max-batch", type=int, default=None, help="ages per pass of the batched run (default all)")
    edit.add_argument(
        "--inversion-graph",
        choices=("on", "off"),
        default="on",
        help="CUDA-graph replay of the inversion's UNet on a GPU (default on, as in the library)",
    )
    edit.add_argument(
        "--graph-check-steps",
        type=int,
        default=0,
        help="first compare a short inversion of this many steps eagerly and from CUDA graphs (edit_graph_check)",
    )
    lora = parser.add_argument_group("lora_effect (benchmarks/lora_effect.py)")
    lora.add_argument("--lora-ages", default="10,40,80", help="target ages of the lora_effect edits (10,40,80)")
    lora.add_argument("--lora-train-steps", type=int, default=800, help="LoRA training steps (the paper's 800)")
    lora.add_argument("--lora-lr", type=float, default=1e-6, help="LoRA learning rate (the paper's 1e-6)")
    lora.add_argument(
        "--lora-train-dtype",
        default="bf16",
        help="the default training precision checked against fp32 (bf16: bf16 weights under autocast); none: skip",
    )
    lora.add_argument(
        "--lora-candidates",
        default=None,
        help="edit --dtype values to measure (default: tf32,bf16,bf16-lora32,bf16-fused,fp16,fp16-vae32 on a GPU, "
        "bf16,bf16-lora32,bf16-fused,fp16-vae32 on a CPU)",
    )
    lora.add_argument(
        "--lora-inner-repeats", type=int, default=20, help="timed inner steps with and without the LoRA (0: skip)"
    )
    lora.add_argument(
        "--lora-checks",
        choices=("on", "off"),
        default="on",
        help="also edit (a) again (R must be 0) and with the LoRA unfused in fp32 (within 1e-5 of fused); on",
    )
    lora.add_argument(
        "--graph-check-train-steps",
        type=int,
        default=50,
        help="train_graph_check: steps run from the CUDA graph and eagerly from the same seeds (50)",
    )
    edit.add_argument(
        "--edit-lora",
        choices=("none", "random"),
        default="none",
        help="random: edit with a rank-16 LoRA loaded as `selfage edit` loads one (B ~ N(0, 8e-4), the size 800 "
        "steps at lr 1e-6 reach), applied as --dtype says (default none: the plain pipeline)",
    )
    commands = parser.add_argument_group("commands (benchmarks/commands.py)")
    commands.add_argument("--command-repeats", type=int, default=3, help="runs of each command (3; median)")
    commands.add_argument("--command-train-steps", type=int, default=800, help="selfage train --steps (800)")
    align = parser.add_argument_group("align")
    align.add_argument("--align-photos", type=int, default=4, help="photos per size and mode in the align benchmark")
    align.add_argument("--align-sizes", default="1MP,12MP", help="photo sizes (1MP, 12MP, 48MP; default 1MP,12MP)")
    return parser.parse_args(argv)


def selected(what: str) -> list[str]:
    names = [w.strip() for w in what.split(",") if w.strip()]
    if "all" in names:
        return list(WHATS)
    unknown = [n for n in names if n not in WHATS + EXTRA_WHATS]
    if unknown or not names:
        raise SystemExit(
            f"--what {what!r}: use align, train, edit, all or a comma list of them "
            f"(also {', '.join(EXTRA_WHATS)}, which 'all' leaves out)."
        )
    return names


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the selected benchmarks; return every record emitted."""
    args = parse_args(argv)
    whats = selected(args.what)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from benchmarks.harness import Recorder
    from selfage_cli import console
    from selfage_cli.models import build_random_pipeline, dtype_name, resolve_device, resolve_dtype

    console.configure(quiet=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    from selfage_cli.edit.engine.precision import PRECISIONS

    train_dtype = PRECISIONS[args.dtype].weights if args.dtype in PRECISIONS else args.dtype  # e.g. bf16-lora32
    weights_dtype = resolve_dtype(train_dtype, device)
    recorder = Recorder(model=args.model, device=device, dtype=dtype_name(weights_dtype), out=args.out)
    records: list[dict[str, Any]] = []

    def make_pipe(dtype: torch.dtype = torch.float32) -> Any:
        return build_random_pipeline(args.model, seed=args.seed, device=device, dtype=dtype)

    if "align" in whats:
        records += run_align(recorder, args)
    if "train" in whats:
        from benchmarks.train import bench_train

        steps = args.train_steps if args.train_steps is not None else (20 if args.model == "sd15" else 5)
        records += bench_train(
            recorder,
            lambda: make_pipe(weights_dtype),  # as `selfage train` loads it: frozen weights in the run's dtype
            device=device,
            dtype=dtype_name(weights_dtype),
            faces=faces(),
            steps=steps,
            warmup=args.train_warmup,
            batch_size=args.train_batch,
            rank=args.rank,
            latent_cache_modes=tuple(m.strip() == "on" for m in args.train_cache_modes.split(",") if m.strip()),
            compile_mode=None if args.train_compile == "off" else args.train_compile,
            profile_steps=args.train_profile,
            cuda_graph=args.train_graph == "on",
        )
    if "edit" in whats:
        from benchmarks.edit import bench_edit
        from benchmarks.lora_effect import edit_pipeline
        from selfage_cli.edit.engine.precision import resolve_edit_precision

        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if args.naive_modes is None:
            naive = modes[:1]
        elif args.naive_modes == "all":
            naive = modes
        elif args.naive_modes == "none":
            naive = []
        else:
            naive = [m.strip() for m in args.naive_modes.split(",") if m.strip()]
        precision = resolve_edit_precision(args.dtype, device)  # as `selfage edit --dtype` chooses
        pipe, lora_applied = edit_pipeline(make_pipe, precision, device=device, lora=args.edit_lora, rank=args.rank)
        recorder.dtype = precision.name
        records += bench_edit(
            recorder,
            pipe,
            lora_applied=lora_applied,
            device=device,
            photo=faces()[0],
            ages=[int(a) for a in args.ages.split(",")],
            source_age=args.source_age,
            steps=args.ddim_steps,
            inner_steps=args.inner_steps,
            guidance=args.guidance,
            modes=modes,
            naive_modes=naive,
            repeats=args.repeats,
            max_batch=args.max_batch,
            warmup=not args.no_warmup,
            compile_inversion=args.compile_inversion,
            cuda_graph=args.inversion_graph == "on",
            graph_check_steps=args.graph_check_steps,
        )
    if "lora_effect" in whats:
        from benchmarks.lora_effect import bench_lora_effect

        candidates = [c.strip() for c in args.lora_candidates.split(",") if c.strip()] if args.lora_candidates else None
        records += bench_lora_effect(
            recorder,
            make_pipe,  # fp32; each edit casts it to the candidate's precision
            device=device,
            photo=faces()[0],
            faces=faces(),
            ages=[int(a) for a in args.lora_ages.split(",")],
            source_age=args.source_age,
            train_steps=args.lora_train_steps,
            lr=args.lora_lr,
            rank=args.rank,
            train_dtype=None if args.lora_train_dtype == "none" else args.lora_train_dtype,
            steps=args.ddim_steps,
            inner_steps=args.inner_steps,
            guidance=args.guidance,
            candidates=candidates,
            inner_step_repeats=args.lora_inner_repeats,
            checks=args.lora_checks == "on",
        )
    if "commands" in whats:
        from benchmarks.commands import bench_commands

        records += bench_commands(
            recorder,
            model=args.model,
            device=device,
            dtype=args.dtype,
            faces=faces(),
            repeats=args.command_repeats,
            train_steps=args.command_train_steps,
            ages=[int(a) for a in args.ages.split(",")],
            ddim_steps=args.ddim_steps,
            inner_steps=args.inner_steps,
        )
    if "train_graph_check" in whats:
        from benchmarks.train import bench_train_graph_check

        records += bench_train_graph_check(
            recorder,
            lambda: make_pipe(weights_dtype),
            device=device,
            dtype=dtype_name(weights_dtype),
            faces=faces(),
            steps=args.graph_check_train_steps,
            batch_size=args.train_batch,
            rank=args.rank,
        )
    return records


def run_align(recorder: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The align benchmark (benchmarks/align.py), skipped with a JSON line when dlib is missing.

    Seconds per photo for each size: ``single`` (one process, models loaded, median over the photos
    after a warm-up) and ``pooled`` (the stage's process pool, wall time / photos, start-up included).
    """
    try:
        import dlib  # noqa: F401

        from benchmarks.align import bench_align
    except ImportError as exc:
        return [recorder.emit("align_skipped", {}, reason=f"dlib or the face models are missing ({exc})")]
    sizes = tuple(s.strip() for s in args.align_sizes.split(",") if s.strip())
    records = []
    for result in bench_align(sizes, pooled=True, photos=args.align_photos, print_lines=False):
        settings = {
            "size": result["size"],
            "pixels": result["pixels"],
            "mode": result["mode"],
            "workers": result["workers"],
            "photos": result["photos"],
            "detector": result["detector"],
            "output_size": result["output_size"],
        }
        rss_mb = result.get("peak_rss_mb", result.get("peak_rss_mb_worker"))
        memory = {
            "peak_memory_bytes": int(rss_mb * 2**20),
            "peak_memory_kind": "process_ru_maxrss" if result["mode"] == "single" else "children_ru_maxrss",
        }
        records.append(
            recorder.emit(
                f"align_{result['mode']}",
                settings,
                None,
                memory,
                seconds=result["seconds_per_photo"],
                seconds_per_photo=result["seconds_per_photo"],
            )
        )
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
