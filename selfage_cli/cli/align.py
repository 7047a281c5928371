"""``selfage align``: FFHQ alignment of raw photos into the project."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfage_cli.cli.common import Common, DebugOpt, JsonOpt, ProjectOpt, QuietOpt, run


def align(
    ctx: typer.Context,
    sources: Annotated[
        list[Path] | None, typer.Argument(help="Photos or folders (searched recursively).", show_default=False)
    ] = None,
    role: Annotated[
        str, typer.Option("--role", help="refs (photos of you at known ages, for training) or inputs (photos to edit).")
    ] = "refs",
    size: Annotated[int, typer.Option("--size", help="Output side in pixels (FFHQ crop, 64–4096).")] = 512,
    detector: Annotated[
        str, typer.Option("--detector", help="hog (fast, frontal) or cnn (dlib MMOD, slower, finds harder faces).")
    ] = "hog",
    all_faces: Annotated[
        bool,
        typer.Option(
            "--all-faces", help="Write one aligned image per face found instead of only the most confident one."
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Only run the identity check of the aligned references (pairwise dlib descriptor distances).",
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Processes (0: one per core once there are at least 3 photos per process, else in-process).",
        ),
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="Re-align photos already aligned.")] = False,
    project: ProjectOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Detect, landmark and FFHQ-align faces from raw photos into the project.

    Aligned PNGs go to refs/aligned/ or inputs/aligned/ and are recorded in selfage.json with the source's sha256, the detector box and the 68 landmarks. Re-running skips photos already aligned (same sha256) unless --force.

    Photos without a usable face (none found, eye centres less than 32 px apart, unreadable file) are listed with the reason and skipped; the exit code is then 1. After aligning references, the identity check warns about any photo that may show someone else. Details: docs/alignment.md.

    Examples:

      selfage align ./me -p proj

      selfage align holiday.jpg --role inputs -p proj

      selfage align --check -p proj
    """
    common = Common.of(ctx)

    def action():
        from selfage_cli.faces.stage import check_identity, run_align

        proj = common.open_project()
        if check:
            return check_identity(proj)
        return run_align(
            proj,
            sources or [],
            role=role,
            size=size,
            detector=detector,
            all_faces=all_faces,
            force=force,
            workers=workers,
        )

    run(common, action)


def register(app: typer.Typer) -> None:
    app.command("align")(align)
