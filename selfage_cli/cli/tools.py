"""Helper commands: ``selfage demo``, ``selfage doctor`` and ``selfage random-model``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfage_cli.cli.ages import AgeEstimatorOpt
from selfage_cli.cli.common import (
    BaseModelOpt,
    Common,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    run,
)


def demo(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="Folder for the demo project (created).")] = Path("demo-project"),
    force: Annotated[bool, typer.Option("--force", help="Reuse a non-empty demo folder.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run every stage end to end, offline, on a tiny random model and two public-domain photos.

    The pictures it makes are meaningless (the model is random); it shows that the install works
    and what each stage writes. Real results need SD 1.5 weights (see README).

    Example:

      selfage demo ./demo-project
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.demo import run_demo

        return run_demo(folder, force=force)

    run(common, action)


def doctor(
    ctx: typer.Context,
    project: ProjectOpt = None,
    base_model: BaseModelOpt = None,
    dex_weights: Annotated[
        Path | None,
        typer.Option(
            "--dex-weights", envvar="SELFAGE_DEX_WEIGHTS", show_default=False, help="DEX checkpoint to check."
        ),
    ] = None,
    age_estimator: AgeEstimatorOpt = "auto",
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check the installation: versions, device, base model, DEX weights, age estimators and dlib models.

    Lists the installed versions and checks the device, the base model (a local diffusers folder, or a
    Hub id already in the Hugging Face cache), the DEX weights, the builtin age estimator (version and
    model checksums), which estimator --age-estimator picks, and dlib's model files; each missing
    piece comes with its fix. Nothing is downloaded or loaded; the exit code is 0 either way.

    Example:

      selfage doctor --base-model ./sd15 --dex-weights dex_age_classifier.pth
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.doctor import diagnose

        proj = common.open_project()
        return diagnose(
            base_model=common.resolved_base_model(proj),
            dex_weights=dex_weights,
            device=device,
            project=proj,
            age_estimator=age_estimator,
        )

    run(common, action)


def random_model(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers pipeline into.")],
    arch: Annotated[
        str,
        typer.Option(
            "--arch",
            help="tiny (128 px, seconds on a CPU), sd15 (the exact SD 1.5 architecture, ~4 GB) or tiny-sd2 "
            "(SD 2.x's traits at tiny size: v-prediction, 192 px).",
        ),
    ] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights (same seed, same model).")] = 0,
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Overwrite a model already in OUT_DIR.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a randomly initialised SD-1.x pipeline (for tests, benchmarks and offline install checks).

    The folder is an ordinary diffusers pipeline (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/ with SD 1.5's CLIP vocabulary, scheduler/) that every command takes as --base-model.
    Its pictures are meaningless; its shapes and costs are those of the real architecture.

    Examples:

      selfage random-model ./tiny-sd

      selfage random-model ./sd15-random --arch sd15 --device cuda
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.models import save_random_model
        from selfage_cli.summary import StageSummary

        out = save_random_model(out_dir, arch=arch, seed=seed, device=device, force=force)
        summary = StageSummary("random-model", done=[{"path": str(out), "arch": arch}])
        summary.lines.append(f"wrote a random {arch} pipeline to {out} (use it with --base-model {out})")
        return summary

    run(common, action)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("doctor")(doctor)
    app.command("random-model")(random_model)
