"""``selfage train``: personalised LoRA fine-tuning (DreamBooth + age prompts + contrastive loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfage_cli.cli.common import (
    BaseModelOpt,
    Common,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    options_given,
    run,
)

# The options whose explicit use --resume checks (parameter name → TrainConfig field or run_train argument).
RESUME_CHECKED = {
    "refs": "refs",
    "reg": "reg",
    "birth_date": "birth_date",
    "ages_file": "ages_file",
    "steps": "steps",
    "batch_size": "batch_size",
    "rank": "rank",
    "lr": "lr",
    "num_refs": "num_refs",
    "prior_weight": "prior_weight",
    "contrast_weight": "contrast_weight",
    "instance_prompt": "instance_prompt",
    "class_prompt": "class_prompt",
    "no_train_text_encoder": "train_text_encoder",
    "resolution": "resolution",
    "seed": "seed",
    "gradient_accumulation": "gradient_accumulation",
    "base_model": "base_model",
}


def given_options(ctx: typer.Context) -> frozenset[str]:
    """The checked options given on the command line or through the environment (not left at their default)."""
    return frozenset(RESUME_CHECKED[name] for name in options_given(ctx, RESUME_CHECKED))


def train(
    ctx: typer.Context,
    refs: Annotated[
        Path | None,
        typer.Option(
            "--refs",
            help="Folder of raw photos of you with known ages; aligned and labelled first if the project lacks them.",
            show_default=False,
        ),
    ] = None,
    reg: Annotated[
        Path | None,
        typer.Option(
            "--reg",
            help="Regularisation folder (other people's aligned faces); labelled first if needed.",
            show_default=False,
        ),
    ] = None,
    birth_date: Annotated[
        str | None, typer.Option("--birth-date", help="YYYY-MM-DD, for EXIF-dated --refs.", show_default=False)
    ] = None,
    ages_file: Annotated[
        Path | None, typer.Option("--ages-file", help="name,age CSV for --refs.", show_default=False)
    ] = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            help="Optimisation steps. With --resume: a larger value extends the run (also a finished one that kept "
            "its last checkpoint) to that many steps, as if it had been started with it.",
        ),
    ] = 800,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Reference images per step (as many regularisation images are added).")
    ] = 4,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank (alpha = rank).")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (constant, AdamW).")] = 1e-6,
    num_refs: Annotated[int, typer.Option("--num-refs", help="References used: the first N by file name.")] = 3,
    prior_weight: Annotated[float, typer.Option("--prior-weight", help="Weight of the prior-preservation loss.")] = 1.0,
    contrast_weight: Annotated[
        float, typer.Option("--contrast-weight", help="Weight of the contrastive (NT-Xent) loss.")
    ] = 0.1,
    instance_prompt: Annotated[
        str, typer.Option("--instance-prompt", help="Prompt before ' as {age}-year-old'.")
    ] = "photo of sks person",
    class_prompt: Annotated[
        str, typer.Option("--class-prompt", help="Regularisation prompt before ' as {age}-year-old'.")
    ] = "photo of person",
    no_train_text_encoder: Annotated[
        bool, typer.Option("--no-train-text-encoder", help="Freeze the text encoder (no text LoRA).")
    ] = False,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution",
            help="Training resolution in pixels (default: the base model's native one; SD 1.5: 512, the tiny "
            "test model: 128). Images of another size are resized with a warning.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed of the LoRA initialisation, the batch order and every micro-batch's noise (draw_seed)."
        ),
    ] = 42,
    gradient_accumulation: Annotated[
        int, typer.Option("--gradient-accumulation", help="Steps to accumulate gradients over.")
    ] = 1,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            "--checkpoint-every", help="Write a resumable checkpoint every N steps and at the end (0: only on Ctrl-C)."
        ),
    ] = 200,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="Checkpoints kept.")] = 2,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run from its last checkpoint, with the method options and base model it was started "
            "with; giving another value of one of those (or --refs, --reg) is refused, --steps extends the run.",
        ),
    ] = False,
    run_name: Annotated[
        str | None,
        typer.Option(
            "--run",
            envvar="SELFAGE_RUN",
            help="Run name (folder runs/NAME; default: a timestamp).",
            show_default=False,
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Less memory, ~30% slower.")
    ] = False,
    use_8bit_adam: Annotated[
        bool, typer.Option("--use-8bit-adam", help="bitsandbytes 8-bit AdamW (CUDA; less memory).")
    ] = False,
    compile_unet: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the UNet (GPU): a compile of minutes, then faster steps; pays off on long "
            "runs or with a warm compile cache (docs/benchmarks.md).",
        ),
    ] = False,
    compile_mode: Annotated[
        str | None,
        typer.Option(
            "--compile-mode",
            help="torch.compile mode (implies --compile): reduce-overhead (CUDA graphs; the default), default, "
            "max-autotune, max-autotune-no-cudagraphs.",
            show_default=False,
        ),
    ] = None,
    cuda_graph: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graph/--no-cuda-graph",
            help="Replay each step from one CUDA graph (same operations, faster steps on a GPU; no "
            "compile), checked against eager execution at its first replay, which it falls back to. "
            "Default: on wherever it works (a CUDA GPU, one process, no --compile, --gradient-accumulation, "
            "--gradient-checkpointing, --use-8bit-adam or fp16); --cuda-graph warns where it cannot.",
            show_default=False,
        ),
    ] = None,
    no_latent_cache: Annotated[
        bool,
        typer.Option(
            "--no-latent-cache", help="Re-encode images through the VAE every step, as the reference does (slower)."
        ),
    ] = False,
    validate_ages: Annotated[
        str | None,
        typer.Option(
            "--validate-ages",
            help="Render these ages at the end into a labelled grid, e.g. 10,40,70.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a finished run of the same name.")] = False,
    project: ProjectOpt = None,
    base_model: BaseModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune SD with LoRA on your references (SelfAge): 800 steps, rank 16, lr 1e-6, batch 4+4.

    With --refs, photos the project does not hold yet are aligned and labelled first (ages from file
    names like 34_beach.jpg, --ages-file, or EXIF with --birth-date). The first --num-refs labelled
    references by file name are used. Writes runs/NAME/pytorch_lora_weights.safetensors (diffusers
    LoRA format) and its JSON, and records the run in selfage.json. Ctrl-C (or SIGTERM) ends the step,
    saves a checkpoint and exits 130; --resume continues bit-identically. Multi-GPU: accelerate launch
    -m selfage_cli train ...

    Examples:

      selfage train --refs ./me -p proj

      selfage train --refs ./me --birth-date 1990-04-02 --reg ./reg -p proj

      selfage train --resume --run my-run -p proj

      selfage train --resume --run my-run --steps 1200 -p proj   # extend a run to 1,200 steps
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.train.config import TrainConfig
        from selfage_cli.train.stage import run_train

        proj = common.open_project()
        config = TrainConfig(
            base_model=common.resolved_base_model(proj),
            steps=steps,
            batch_size=batch_size,
            rank=rank,
            lr=lr,
            num_refs=num_refs,
            prior_weight=prior_weight,
            contrast_weight=contrast_weight,
            instance_prompt=instance_prompt,
            class_prompt=class_prompt,
            train_text_encoder=not no_train_text_encoder,
            resolution=resolution,
            seed=seed,
            gradient_accumulation=gradient_accumulation,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            gradient_checkpointing=gradient_checkpointing,
            use_8bit_adam=use_8bit_adam,
            compile=compile_unet or compile_mode is not None,
            compile_mode=compile_mode or TrainConfig.compile_mode,
            cuda_graph=cuda_graph,
            latent_cache=not no_latent_cache,
            validate_ages=validate_ages,
            device=device,
            dtype=dtype,
        )
        return run_train(
            proj,
            config,
            refs=refs,
            reg=reg,
            birth_date=birth_date,
            ages_file=ages_file,
            run_name=run_name,
            resume=resume,
            force=force,
            given=given_options(ctx),
        )

    run(common, action, several_processes=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
