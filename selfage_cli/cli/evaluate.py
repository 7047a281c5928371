"""``selfage eval``: age error, identity distance and reconstruction quality of recorded edits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfage_cli.cli.common import Common, DebugOpt, DeviceOpt, JsonOpt, ProjectOpt, QuietOpt, run


def evaluate(
    ctx: typer.Context,
    edits: Annotated[
        list[str] | None,
        typer.Argument(
            help="Edits to evaluate, by input stem or path (default: all recorded edits).", show_default=False
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Folder for report.json, report.md and contact_sheet.png (default: PROJECT/eval).",
            show_default=False,
        ),
    ] = None,
    dex_weights: Annotated[
        Path | None,
        typer.Option(
            "--dex-weights",
            envvar="SELFAGE_DEX_WEIGHTS",
            help="DEX checkpoint (default: the path the project remembers); without it the builtin estimator "
            "measures the ages.",
            show_default=False,
        ),
    ] = None,
    age_estimator: Annotated[
        str,
        typer.Option(
            "--age-estimator",
            help="dex, builtin, auto (DEX when its weights are known, else builtin) or both (DEX and builtin "
            "side by side; needs the DEX weights).",
        ),
    ] = "auto",
    project: ProjectOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score edits: age error per target age, dlib identity distance, reconstruction PSNR/SSIM.

    Scores every recorded edit (or the EDITs named: input ids or photo names) and writes report.json,
    report.md and contact_sheet.png to eval/ (or --report DIR), replacing an earlier report. The age
    estimator (DEX when its weights are known, else the builtin one) is named in the report; with
    --age-estimator both, DEX and builtin are reported side by side. See docs/eval.md.

    Examples:

      selfage eval -p proj

      selfage eval photo --report ./report --json -p proj

      selfage eval --age-estimator both --dex-weights dex_age_classifier.pth -p proj
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.eval.stage import run_evaluate

        return run_evaluate(
            common.open_project(),
            edits=edits or [],
            report_dir=report,
            dex_weights=dex_weights,
            device=device,
            age_estimator=age_estimator,
        )

    run(common, action)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
