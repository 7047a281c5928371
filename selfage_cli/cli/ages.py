"""``selfage label-ages`` and ``selfage make-reg``: ages of the references and the regularisation set."""

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
    run,
)

DexWeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--dex-weights",
        show_default=False,
        help="DEX age classifier checkpoint (dex_age_classifier.pth from the SAM project, "
        "yuval-alaluf/SAM); default: $SELFAGE_DEX_WEIGHTS, else the path the project remembers. "
        "Given here, it is remembered in the project.",
    ),
]

AgeEstimatorOpt = Annotated[
    str,
    typer.Option(
        "--age-estimator",
        help="dex (the paper's; needs --dex-weights), builtin (bundled, no download; also estimates the gender) "
        "or auto (DEX when its weights are known, else builtin). See docs/ages.md.",
    ),
]


def label_ages(
    ctx: typer.Context,
    ages: Annotated[
        list[str] | None, typer.Argument(help="Optional NAME=AGE pairs (file name or stem).", show_default=False)
    ] = None,
    reg: Annotated[
        Path | None,
        typer.Option(
            "--reg",
            help="Also label this folder of other people's aligned faces as the regularisation set.",
            show_default=False,
        ),
    ] = None,
    ages_file: Annotated[
        Path | None, typer.Option("--ages-file", help="CSV of name,age lines.", show_default=False)
    ] = None,
    birth_date: Annotated[
        str | None,
        typer.Option(
            "--birth-date", help="YYYY-MM-DD: with EXIF dates gives the age at each photo.", show_default=False
        ),
    ] = None,
    dex_weights: DexWeightsOpt = None,
    prefer: Annotated[
        str,
        typer.Option(
            "--prefer",
            help="Priority of age sources (file, filename, exif, estimate): the first with a value wins; sources "
            "left out are not used. estimate is the --age-estimator's (also accepted as dex or builtin).",
        ),
    ] = "file,filename,exif,estimate",
    age_estimator: AgeEstimatorOpt = "auto",
    dex_preprocess: Annotated[
        str,
        typer.Option(
            "--dex-preprocess",
            help="antialias (512→256 antialiased, then 224) or reference (the reference's direct 512→224).",
        ),
    ] = "antialias",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="With --reg: replace a regularisation set recorded before (generated, or another folder)."
        ),
    ] = False,
    project: ProjectOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Give every aligned reference (and, with --reg, every regularisation image) an integer age.

    Sources, by default in this priority: an ages file or NAME=AGE pairs; the file name
    convention {age}_anything.jpg; the EXIF date with --birth-date; an age estimator (DEX or builtin).
    Sources left out of --prefer are not used. The estimator (--age-estimator: DEX when its weights
    are known, else the builtin one, which needs no download) runs only for images with no age from an
    earlier source, or on every image when --dex-weights is given (its estimate then also feeds the
    conflict warnings); the manifest records which estimator gave each age. Conflicting sources produce a warning listing both values. User files are never
    renamed or modified. See docs/ages.md.

    Examples:

      selfage label-ages -p proj                      # ages from file names like 34_beach.jpg

      selfage label-ages --birth-date 1990-04-02 -p proj

      selfage label-ages me_2010.jpg=20 me_2020.jpg=30 -p proj

      selfage label-ages --reg ./reg_faces --dex-weights dex_age_classifier.pth -p proj

      selfage label-ages --reg ./reg_faces --age-estimator builtin -p proj
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.ages.stage import run_label_ages as label

        return label(
            common.open_project(),
            pairs=ages or [],
            reg=reg,
            ages_file=ages_file,
            birth_date=birth_date,
            dex_weights=dex_weights,
            prefer=prefer,
            dex_preprocess=dex_preprocess,
            device=device,
            age_estimator=age_estimator,
            force=force,
        )

    run(common, action)


def make_reg(
    ctx: typer.Context,
    count: Annotated[int, typer.Option("--count", help="Number of images to generate.")] = 200,
    age_range: Annotated[str, typer.Option("--age-range", help="LOW-HIGH ages, spread evenly.")] = "0-90",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Check each image's age with DEX when its weights are available and report disagreements.",
        ),
    ] = True,
    dex_weights: DexWeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images generated per batch.")] = 4,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps per image.")] = 50,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the generation: image i uses seed + i, so a set is reproducible.")
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing generated set.")] = False,
    project: ProjectOpt = None,
    base_model: BaseModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Generate an age-labelled regularisation set with the base model itself (no download).

    Prompts "photo of person as {age}-year-old" with ages spread evenly over --age-range; each
    image is aligned when a face is found and recorded with its prompted age.

    Examples:

      selfage make-reg --count 200 -p proj

      selfage make-reg --count 40 --age-range 10-70 --base-model ./sd15 -p proj
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.ages.regularisation import run_make_reg as generate

        proj = common.open_project()
        return generate(
            proj,
            count=count,
            age_range=age_range,
            verify=verify,
            dex_weights=dex_weights,
            batch_size=batch_size,
            steps=steps,
            seed=seed,
            force=force,
            base_model=common.base_model,
            device=device,
            dtype=dtype,
        )

    run(common, action)


def register(app: typer.Typer) -> None:
    app.command("label-ages")(label_ages)
    app.command("make-reg")(make_reg)
