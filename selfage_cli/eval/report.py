"""The files ``selfage eval`` writes: ``report.json``, ``report.md`` and ``contact_sheet.png``.

The contact sheet has one row per evaluated edit (photo) and one column per target age (the union
over the edits, ascending), preceded by the aligned input. Each tile is captioned with the target
age, the age estimate named by its estimator (``DEX 34.2``, ``builtin 33.0``; ``age –`` without an
estimator) and the identity distance to the input
(``id –`` when no face was found or identity was not measured).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from selfage_cli.files import atomic_save, atomic_write_json, atomic_write_text

TILE = 160
CAPTION_LINES = 3
LINE_HEIGHT = 13
PAD = 4
BACKGROUND = (255, 255, 255)
BLANK = (230, 230, 230)
TEXT = (0, 0, 0)


def json_safe(value: Any) -> Any:
    """The value with non-finite floats replaced by ``None`` (JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


REPORT_FILES = ("report.json", "report.md", "contact_sheet.png")  # what write_report writes into its folder


def write_report(report: dict[str, Any], folder: Path, tiles: dict[tuple[str, Any], Image.Image]) -> dict[str, Path]:
    """Write the three report files into ``folder`` (created); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / name for key, name in zip(("json", "markdown", "contact_sheet"), REPORT_FILES, strict=True)}
    atomic_write_json(paths["json"], json_safe(report))
    atomic_write_text(paths["markdown"], render_markdown(report))
    sheet = contact_sheet(report, tiles)
    atomic_save(paths["contact_sheet"], lambda tmp: sheet.save(tmp, format="PNG"))
    return paths


# ---- markdown --------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 2) -> str:
    """A report cell: ``value`` with ``digits`` decimals (floats), yes/no (booleans), a dash when not measured."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _estimator_names(report: dict[str, Any]) -> list[str]:
    """The estimators of the report, the first being the one ``estimated_age`` holds."""
    return [str(e["estimator"]) for e in report.get("age_estimators") or []]


def _short(name: str | None) -> str:
    return {"dex": "DEX", None: "age"}.get(name, str(name))


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: notes, the summary tables and one table per edit."""
    s = report["summary"]
    threshold = report["identity"]["threshold"]
    out = ["# selfage eval report", "", f"Project: `{report['project']}` — {report['created']}", ""]
    dex = report["dex"]
    names = _estimator_names(report)
    out.append(
        f"DEX weights: `{dex['weights']}` ({dex['preprocess']} preprocessing)"
        if dex["measured"]
        else "DEX weights: none" + ("" if names else " (identity-only report)")
    )
    for described in report.get("age_estimators") or []:
        if described["estimator"] == "builtin":
            out.append(
                f"Builtin age estimator: {described['package']} (age model sha256 "
                f"{described['age_model_sha256'][:12]}, {described['licence']})"
            )
    if names:
        out.append("Age estimated by: " + ", ".join(_short(n) for n in names) + ".")
    out.append(
        f"Identity: dlib 128-d descriptor distance; same person below {threshold}. "
        f"References in the mean descriptor: {report['identity']['references_used']}."
    )
    out.append("")
    for note in report["notes"]:
        out.append(f"> **Note:** {note}")
        out.append("")

    out += ["## Summary", ""]
    rows: list[list[Any]] = [["edits", s["edits"]], ["outputs", s["outputs"]]]
    by_estimator = s.get("age_by_estimator") or {}
    for name, value in by_estimator.items():
        if value:
            rows.append([f"age MAE (years, {_short(name)})", fmt(value["mae"])])
    if s["age"] and not by_estimator:
        rows.append(["age MAE (years)", fmt(s["age"]["mae"])])
    for key, label in (("identity_to_input", "identity to input"), ("identity_to_references", "identity to refs")):
        value = s.get(key)
        if value and not value["count"]:
            rows.append([f"{label}", f"no face found in any of the {value['no_face']} output(s)"])
        elif value:
            share = value["share_under_threshold"]
            rows.append([f"{label}: mean distance", fmt(value["mean"], 3)])
            rows.append([f"{label}: share under {threshold}", "–" if share is None else f"{100 * share:.0f}%"])
            if value["no_face"]:
                rows.append([f"{label}: outputs without a face", value["no_face"]])
    if s["reconstruction"]:
        rows.append(["reconstruction PSNR (dB)", fmt(s["reconstruction"]["psnr_mean"])])
        rows.append(["reconstruction SSIM", fmt(s["reconstruction"]["ssim_mean"], 3)])
    out += _table(["metric", "value"], rows)

    if s["age"]:
        out += ["## Age error by bucket", ""]
        for key, title in (("by_decade", "target decade"), ("by_band", "prompt band"), ("by_target_age", "target age")):
            out += _table(
                [title, "MAE", "outputs"], [[name, fmt(v["mae"]), v["count"]] for name, v in s["age"][key].items()]
            )

    out += ["## Per edit", ""]
    for edit in report["edits"]:
        out.append(f"### {edit['id']}")
        out.append("")
        out.append(
            f"Input `{edit['input']}`, source age {fmt(edit['source_age'], 1)}"
            f" ({_short(names[0] if names else None)} on the input: {fmt(edit['input_estimated_age'], 1)}), "
            f"inversion {edit['inversion'] or '–'}, "
            f"LoRA " + (f"`{edit['lora']}`" if edit["lora"] else "none (base model)") + "."
        )
        out.append("")
        rows = [
            [
                o["target_age"],
                fmt(o["estimated_age"], 1),
                fmt(o["abs_error"], 1),
                *[fmt((o.get("estimates") or {}).get(name), 1) for name in names[1:]],
                fmt(o["distance_to_input"], 3),
                fmt(o["distance_to_references"], 3),
                fmt(o["same_person_as_input"]),
                f"`{o['path']}`",
            ]
            for o in edit["outputs"]
        ]
        first = f"{_short(names[0])} age" if names else "estimated age"
        out += _table(
            [
                "target age",
                first,
                "abs error",
                *[f"{_short(name)} age" for name in names[1:]],
                "dist. to input",
                "dist. to refs",
                "same person",
                "output",
            ],
            rows,
        )
        rec = edit["reconstruction"]
        if rec:
            psnr = "∞ (identical)" if rec["identical"] else fmt(rec["psnr"])
            out.append(
                f"Reconstruction at the source age {rec['target_age']}: PSNR {psnr} dB, "
                f"SSIM {fmt(rec['ssim'], 4)}"
                + (" (input resized to the output's size)" if rec["input_resized"] else "")
                + "."
            )
            out.append("")
    out += ["Files: `report.json` (every number), `contact_sheet.png` (rows = photos, columns = ages).", ""]
    return "\n".join(out)


# ---- contact sheet ---------------------------------------------------------------------------------------
def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _caption(edit: dict[str, Any], output: dict[str, Any] | None, column: Any, label: str = "age") -> list[str]:
    if column == "input":
        return ["input", f"source {fmt(edit['source_age'], 1)}", f"{label} {fmt(edit['input_estimated_age'], 1)}"]
    if output is None:
        return [f"target {column}", "not edited", ""]
    distance = output["distance_to_input"]
    if distance is None:
        identity = "id: no face" if output["face_found"] is False else "id –"
    else:
        identity = f"id {distance:.3f}"
    return [f"target {column}", f"{label} {fmt(output['estimated_age'], 1)}", identity]


def contact_sheet(report: dict[str, Any], tiles: dict[tuple[str, Any], Image.Image], tile: int = TILE) -> Image.Image:
    """Rows = edits, columns = input + every target age; captions under each tile."""
    edits = report["edits"]
    ages = sorted({o["target_age"] for e in edits for o in e["outputs"]})
    columns: list[Any] = ["input", *ages]
    cell_h = tile + CAPTION_LINES * LINE_HEIGHT + 2 * PAD
    cell_w = tile + 2 * PAD
    sheet = Image.new(
        "RGB", (max(1, len(columns)) * cell_w, max(1, len(edits)) * cell_h + LINE_HEIGHT + PAD), BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for row, edit in enumerate(edits):
        top = row * cell_h
        by_age = {o["target_age"]: o for o in edit["outputs"]}
        for col, column in enumerate(columns):
            left = col * cell_w + PAD
            image = tiles.get((edit["id"], column))
            if image is not None:
                sheet.paste(image.convert("RGB").resize((tile, tile), Image.LANCZOS), (left, top + PAD))
            else:
                draw.rectangle([left, top + PAD, left + tile - 1, top + PAD + tile - 1], fill=BLANK)
            label = _short((_estimator_names(report) or [None])[0])
            for line_no, text in enumerate(_caption(edit, by_age.get(column), column, label)):
                draw.text((left, top + PAD + tile + 2 + line_no * LINE_HEIGHT), text, fill=TEXT, font=font)
        draw.text(
            (PAD + 2, top + PAD + 1),
            edit["id"][:24],
            fill=(255, 255, 0),
            font=font,
            stroke_width=1,
            stroke_fill=(0, 0, 0),
        )
    footer = (
        "id = dlib descriptor distance to the input (same person < "
        f"{report['identity']['threshold']}); "
        f"{_short((_estimator_names(report) or [None])[0])} = estimated age"
    )
    draw.text((PAD, sheet.height - LINE_HEIGHT - 1), footer, fill=TEXT, font=font)
    return sheet
