"""``selfage edit``: null-text inversion + prompt-to-prompt age editing, all ages in one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfage_cli.cli.ages import AgeEstimatorOpt
from selfage_cli.cli.common import (
    Common,
    DebugOpt,
    DeviceOpt,
    EditBaseModelOpt,
    EditDtypeOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    options_given,
    run,
)

# What --paste-back-only does not use: it pastes the recorded ages back, editing nothing.
EDITING_OPTIONS = (
    "ages", "paste_back", "lora", "no_lora", "source_age", "gender", "inversion", "ddim_steps", "guidance",
    "inner_steps", "cross_replace", "self_replace", "blend_threshold", "blend_start", "reweight", "max_batch",
    "no_round_source_age", "seed", "compile_unet", "cuda_graph", "age_estimator", "dex_preprocess",
    "dex_weights", "base_model", "dtype",
)  # fmt: skip


def edit(
    ctx: typer.Context,
    images: Annotated[
        list[Path] | None,
        typer.Argument(help="Photos to edit (default: every input in the project).", show_default=False),
    ] = None,
    ages: Annotated[str, typer.Option("--ages", help="Target ages, integers 0–100, comma-separated.")] = "0,20,80",
    side_by_side: Annotated[
        bool, typer.Option("--side-by-side", help="Also write a labelled strip: source then every age.")
    ] = False,
    gif: Annotated[bool, typer.Option("--gif", help="Also write an animation, one frame per age.")] = False,
    paste_back: Annotated[
        bool,
        typer.Option(
            "--paste-back",
            help="Also write each age pasted back into the original photo, at its full size and format "
            "(AGE_full.jpg/.png; with --side-by-side/--gif also strip_full and ages_full.gif).",
        ),
    ] = False,
    paste_back_only: Annotated[
        bool,
        typer.Option(
            "--paste-back-only",
            help="Edit nothing: paste every recorded age of the edits of IMAGES (default: every edit) back "
            "into their photos, as --paste-back does. No model is loaded.",
        ),
    ] = False,
    source_age: Annotated[
        float | None,
        typer.Option(
            "--source-age",
            help="Age in the photo (default: the age recorded for the input, else the --age-estimator's estimate).",
            show_default=False,
        ),
    ] = None,
    gender: Annotated[
        str | None,
        typer.Option(
            "--gender",
            help="female or male: girl/boy, woman/man in prompts; none: the neutral words (child, person). "
            "Default: the builtin estimator's call when it is at least 90 % sure, else the neutral words.",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[
        Path | None,
        typer.Option(
            "--lora",
            help="LoRA file, its folder, or a run name (default: the project's latest finished run).",
            show_default=False,
        ),
    ] = None,
    no_lora: Annotated[
        bool, typer.Option("--no-lora", help="Edit with the base model alone (no personalisation).")
    ] = False,
    inversion: Annotated[
        str,
        typer.Option(
            "--inversion",
            help="null-text (paper), negative-prompt or direct (no optimisation, much faster; direct keeps the "
            "source exactly, PnP Inversion).",
        ),
    ] = "null-text",
    ddim_steps: Annotated[int, typer.Option("--ddim-steps", help="DDIM steps of inversion and editing.")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 7.5,
    inner_steps: Annotated[int, typer.Option("--inner-steps", help="Null-text optimisation steps per timestep.")] = 10,
    cross_replace: Annotated[
        float, typer.Option("--cross-replace", help="Fraction of steps with cross-attention replacement.")
    ] = 0.8,
    self_replace: Annotated[
        float, typer.Option("--self-replace", help="Fraction of steps with self-attention injection.")
    ] = 0.5,
    blend_threshold: Annotated[float, typer.Option("--blend-threshold", help="Local-blend mask threshold.")] = 0.3,
    blend_start: Annotated[
        float, typer.Option("--blend-start", help="Fraction of steps before local blending starts.")
    ] = 0.2,
    reweight: Annotated[
        float,
        typer.Option(
            "--reweight", help="Weight of the new age word's tokens in cross-attention (1 = no re-weighting)."
        ),
    ] = 1.0,
    max_batch: Annotated[
        int | None,
        typer.Option("--max-batch", help="At most this many ages per pass (less memory).", show_default=False),
    ] = None,
    aligned: Annotated[
        bool, typer.Option("--aligned", help="Inputs are already FFHQ-aligned squares: skip alignment.")
    ] = False,
    no_round_source_age: Annotated[
        bool,
        typer.Option(
            "--no-round-source-age", help="Paste the estimate's float age into the prompt, as the reference does."
        ),
    ] = False,
    age_estimator: AgeEstimatorOpt = "auto",
    dex_preprocess: Annotated[
        str,
        typer.Option(
            "--dex-preprocess",
            help="DEX's resize: antialias (512→256 antialiased, then 224) or reference (the reference's direct "
            "512→224).",
        ),
    ] = "antialias",
    dex_weights: Annotated[
        Path | None,
        typer.Option(
            "--dex-weights", envvar="SELFAGE_DEX_WEIGHTS", help="DEX checkpoint for the source age.", show_default=False
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="torch seed set before each photo, as the reference does (the outputs do not depend on it: "
            "DDIM inversion and editing are deterministic).",
        ),
    ] = 0,
    compile_unet: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the inversion's UNet (GPU): a compile of minutes once per call, then a faster "
            "null-text inversion; worth it for many photos per call (docs/benchmarks.md).",
        ),
    ] = False,
    cuda_graph: Annotated[
        bool,
        typer.Option(
            "--cuda-graph/--no-cuda-graph",
            help="On a GPU, replay the inversion's UNet from CUDA graphs (no compile; checked against eager "
            "execution, which it falls back to).",
        ),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    project: ProjectOpt = None,
    base_model: EditBaseModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: EditDtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Edit photos of the person to target ages (null-text inversion + prompt-to-prompt).

    Writes edits/STEM/AGE.png for each age, plus a strip, a GIF and the photo with the aged face
    pasted back (--paste-back) on request, all recorded in
    selfage.json; existing outputs are kept unless --force. The inversion is cached: editing the
    same photo again skips it. Out of GPU memory: use --max-batch. See docs/editing.md.

    Examples:

      selfage edit photo.jpg --ages 0,20,80 --side-by-side -p proj

      selfage edit --ages 10,30,50,70 --gif -p proj          # every input in the project

      selfage edit face.png --aligned --source-age 34 --inversion negative-prompt -p proj

      selfage edit photo.jpg --ages 10,70 --paste-back -p proj   # also edits/photo/70_full.jpg

      selfage edit --paste-back-only --side-by-side -p proj   # earlier edits, back into their photos

      accelerate launch -m selfage_cli edit --ages 0,40,80 -p proj   # photos split across GPUs
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.ages.engine.sources import parse_age_list
        from selfage_cli.edit.config import EditConfig
        from selfage_cli.edit.stage import run_edit

        proj = common.open_project()
        if paste_back_only:
            from selfage_cli.edit.paste_back import check_call, paste_back_recorded

            check_call(aligned, True)
            _refuse_editing_options(ctx)
            return paste_back_recorded(proj, images or [], side_by_side=side_by_side, gif=gif, force=force)
        config = EditConfig(
            ages=parse_age_list(ages, "--ages"),
            side_by_side=side_by_side,
            gif=gif,
            source_age=int(source_age) if source_age is not None and float(source_age).is_integer() else source_age,
            gender=gender,
            inversion=inversion,
            ddim_steps=ddim_steps,
            guidance=guidance,
            inner_steps=inner_steps,
            cross_replace=cross_replace,
            self_replace=self_replace,
            blend_threshold=blend_threshold,
            blend_start=blend_start,
            reweight=reweight,
            max_batch=max_batch,
            round_source_age=not no_round_source_age,
            seed=seed,
            compile=compile_unet,
            cuda_graph=cuda_graph,
            paste_back=paste_back,
            age_estimator=age_estimator,
            dex_preprocess=dex_preprocess,
        )
        return run_edit(
            proj,
            config,
            images=images or [],
            base_model=common.given_base_model(proj),
            lora=lora,
            no_lora=no_lora,
            aligned=aligned,
            dex_weights=dex_weights,
            force=force,
            device=device,
            dtype=dtype,
        )

    run(common, action, several_processes=True)


def register(app: typer.Typer) -> None:
    app.command("edit")(edit)


def _refuse_editing_options(ctx: typer.Context) -> None:
    """--paste-back-only with an option that only editing uses: exit 2 naming it (it would be ignored)."""
    from selfage_cli.errors import SelfageError

    given = options_given(ctx, EDITING_OPTIONS, environment=False)  # a SELFAGE_DEX_WEIGHTS set for every edit is fine
    if given:
        flags = {param.name: param.opts[0] for param in ctx.command.params if param.opts}
        named = ", ".join(flags.get(name, name) for name in given)
        raise SelfageError(
            f"--paste-back-only pastes the recorded ages back and edits nothing, so it does not take {named}; "
            "leave it out (or edit with it: selfage edit PHOTO --paste-back)."
        )
