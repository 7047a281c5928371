"""``selfage label-ages``: give every reference (and every regularisation image) an integer age.

Sources (names used by ``--prefer`` and recorded as ``age_source``):

* ``file``: an ages file (``--ages-file``) or ``NAME=AGE`` pairs (pairs win over the file);
* ``filename``: the ``{age}_anything.ext`` convention, read from the raw photo's name;
* ``exif``: the EXIF date of the raw photo with ``--birth-date`` (references only: a birth date
  belongs to one person);
* ``estimate``: an age estimator's estimate on the aligned image, rounded to whole years: DEX or the
  builtin networks (``--age-estimator``, :mod:`selfage_cli.ages.engine.estimator`); recorded under the
  estimator's name (``age_source: "dex"`` or ``"builtin"``, and in ``age_candidates``). ``dex`` and
  ``builtin`` are accepted in ``--prefer`` as other names of this slot.

The first source in ``--prefer`` order (default ``file,filename,exif,estimate``) that has a value wins;
sources left out of ``--prefer`` are never used. Every source's value is kept in
``age_candidates``, and values from earlier runs stay there until a source is evaluated again
(file names always; EXIF when ``--birth-date`` is given; an estimator when it runs; the ages file/pairs
for the names they list), so ``label-ages --reg DIR`` does not forget ages given earlier with NAME=AGE.
Conflicting values produce a warning listing both (an estimate only when it is more than
``DEX_CONFLICT_YEARS`` off, as estimates are a few years off on their own).

The estimator (``auto``: DEX when its weights are known, else builtin) runs only for images with no
value from the sources before it and no estimate of its own yet, or with DEX on every image when
``--dex-weights`` is given explicitly (then its estimate goes into ``age_candidates`` and into the
conflict warning). A later run with DEX weights re-estimates the images only the builtin estimator
labelled. Nothing is written to the manifest unless every image got a valid age.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfage_cli import console
from selfage_cli.ages.engine import sources
from selfage_cli.errors import SelfageError
from selfage_cli.manifest import (
    AgeLabelled,
    ImageEntry,
    Manifest,
    RegImage,
    Regularisation,
    configured_dex_weights,
    set_age_label,
)
from selfage_cli.manifest import load as load_manifest
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project
from selfage_cli.summary import StageSummary

SOURCES = ("file", "filename", "exif", "estimate")
ESTIMATE = "estimate"
ESTIMATE_ALIASES = ("dex", "builtin")  # old and explicit names of the estimate slot in --prefer
RECORDED_SOURCES = ("file", "filename", "exif", "dex", "builtin")  # age_source / age_candidates keys
DEFAULT_PREFER = "file,filename,exif,estimate"
DEX_CONFLICT_YEARS = 10.0
REFERENCES = "references"
REGULARISATION = "regularisation"

WAYS_TO_GIVE_AN_AGE = (
    "give an age with NAME=AGE or --ages-file CSV (name,age lines), name the photo {age}_anything.jpg, "
    "pass --birth-date YYYY-MM-DD for photos with an EXIF date, or let an estimator estimate it (keep 'estimate' "
    "in --prefer: --age-estimator builtin needs no download, DEX needs --dex-weights dex_age_classifier.pth, "
    "published by the SAM project, yuval-alaluf/SAM)"
)
# The same for `selfage train --refs`, which takes no NAME=AGE pairs.
WAYS_TO_GIVE_AN_AGE_TO_TRAIN = (
    "give an age with --ages-file CSV (name,age lines), name the photo {age}_anything.jpg, pass --birth-date "
    "YYYY-MM-DD for photos with an EXIF date, or label them first with `selfage label-ages` (NAME=AGE pairs, DEX)"
)


@dataclass
class AgeItem:
    """One image to label and what each source says about it."""

    section: str  # "references" or "regularisation"
    id: str
    source: Path | None  # the raw photo (references) or the user's image (regularisation)
    image: Path  # what DEX looks at: the aligned image (references) or the image itself
    names: set[str]  # lower-cased names an ages file or NAME=AGE may use for it
    candidates: dict[str, float] = field(default_factory=dict)
    exif_error: str | None = None
    age: int | None = None
    age_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.source) if self.source is not None else str(self.image)


def parse_prefer(prefer: str) -> list[str]:
    """``--prefer file,filename,exif,dex`` → ordered source names (subset, no duplicates)."""
    names = [part.strip().lower() for part in (prefer or "").split(",") if part.strip()]
    names = [ESTIMATE if name in ESTIMATE_ALIASES else name for name in names]
    if not names:
        raise SelfageError(f"--prefer is empty; list age sources in priority order, e.g. --prefer {DEFAULT_PREFER}.")
    for name in names:
        if name not in SOURCES:
            raise SelfageError(
                f"--prefer: unknown age source {name!r}; use some of {', '.join(SOURCES)} (dex or builtin for "
                "estimate)."
            )
    if len(set(names)) != len(names):
        raise SelfageError(f"--prefer {prefer}: a source is listed twice; list each once.")
    return names


def run_label_ages(
    project: Project,
    *,
    pairs: list[str] | None = None,
    reg: Path | None = None,
    ages_file: Path | None = None,
    birth_date: str | None = None,
    dex_weights: Path | None = None,
    prefer: str = DEFAULT_PREFER,
    dex_preprocess: str = "antialias",
    device: str = "auto",
    age_estimator: str = "auto",
    force: bool = False,
    ways_to_give_an_age: str = WAYS_TO_GIVE_AN_AGE,
) -> StageSummary:
    """Label the project's references (and the ``reg`` folder's images) with integer ages; see the module doc.

    ``force``: ``reg`` may replace a regularisation set recorded before (generated, or another folder);
    without it that is refused (exit 2). ``ways_to_give_an_age``: the fix named when an image has no age
    (the calling command's options)."""
    from selfage_cli.ages.engine.dex import check_preprocess

    summary = StageSummary("label-ages")
    order = parse_prefer(prefer)
    check_preprocess(dex_preprocess)
    from selfage_cli.ages.engine.estimator import check_choice

    age_estimator = check_choice(age_estimator)
    given = sources.parse_ages_file(ages_file) if ages_file is not None else {}
    from_pairs = sources.parse_pairs(list(pairs or []))
    for name, age in from_pairs.items():
        if name in given and given[name] != age:
            console.warn(f"{name}: NAME=AGE gives {age}, --ages-file gives {given[name]}; using {age}.")
        given[name] = age
    birth = sources.parse_birth_date(birth_date)
    if given and "file" not in order:
        console.warn(
            "ages from --ages-file/NAME=AGE are recorded as candidates but not used: --prefer leaves out 'file'."
        )
    if birth is not None and "exif" not in order:
        console.warn("--birth-date is given but --prefer leaves out 'exif'; EXIF ages are recorded but not used.")

    manifest = load_manifest(project)
    references = manifest.references
    if not references and reg is None:
        raise SelfageError(
            f"{project.manifest_path if project.exists() else project.root}: the project has no references to "
            "label; run `selfage align PHOTOS... -p PROJECT` first (or `selfage train --refs DIR`)."
        )
    items = [_reference_item(project, entry) for entry in references]
    reg_folder: Path | None = None
    if reg is not None:
        reg_folder, reg_items = _regularisation_items(reg, manifest, summary)
        if not force:
            _refuse_replacing_set(manifest, reg_folder)
        items.extend(reg_items)

    _apply_names(items, given)
    for item in items:
        name_age = sources.age_from_filename(item.source.name if item.source is not None else item.id)
        if name_age is None:
            item.candidates.pop("filename", None)
        else:
            item.candidates["filename"] = name_age
        if birth is not None and item.section == REFERENCES:
            _exif_candidate(item, birth)

    preference = _run_estimator_if_needed(project, items, order, dex_weights, dex_preprocess, device, age_estimator)
    _choose(items, order, preference, ways_to_give_an_age)
    _write(project, items, reg_folder, dex_weights, summary)
    return summary


def _refuse_replacing_set(manifest: Manifest, reg_folder: Path) -> None:
    """Exit 2 when ``--reg`` would replace another regularisation set recorded before (docs/ages.md: only with --force)."""
    previous = manifest.regularisation
    if previous.images and (previous.generated or previous.folder != str(reg_folder)):
        what = "a generated set" if previous.generated else f"the folder {previous.folder}"
        raise SelfageError(
            f"--reg {reg_folder}: the project's regularisation set is {what} ({len(previous.images)} images); "
            "pass --force to replace it with this folder (no file is deleted)."
        )


# ---- the images ----------------------------------------------------------------------------------------
def _reference_item(project: Project, entry: ImageEntry) -> AgeItem:
    ident = str(entry.id)
    aligned_rel = entry.aligned
    if not aligned_rel:
        raise SelfageError(
            f"{project.manifest_path}: reference {ident!r} has no aligned image; run `selfage align` on its photo "
            "again."
        )
    aligned = project.path(aligned_rel)
    source = Path(entry.source) if entry.source else None
    names = {ident, aligned.name, aligned.stem}
    if source is not None:
        names |= {source.name, source.stem}
    item = AgeItem(REFERENCES, ident, source, aligned, {n.lower() for n in names})
    item.candidates = _previous_candidates(entry)
    return item


def _previous_candidates(entry: AgeLabelled) -> dict[str, float]:
    """The candidates recorded by an earlier run (plus its chosen age, when no candidates were kept)."""
    label = entry.age_label
    previous = {k: v for k, v in label.candidates.items() if k in RECORDED_SOURCES and v is not None}
    if label.value is not None and label.source in RECORDED_SOURCES:
        previous.setdefault(label.source, label.value)
    return previous


def _regularisation_items(reg: Path, manifest: Manifest, summary: StageSummary) -> tuple[Path, list[AgeItem]]:
    from selfage_cli.ages.engine.regularisation import scan_reg_folder

    folder, images, unreadable = scan_reg_folder(reg)
    for path, reason in unreadable:
        summary.fail(str(path), reason)
    before = {str(img.source): img for img in manifest.regularisation.images if img.source}
    items: list[AgeItem] = []
    for path, size in images:
        rel = path.relative_to(folder)
        ident = rel.with_suffix("").as_posix()
        names = {ident, rel.as_posix(), path.name, path.stem}
        item = AgeItem(REGULARISATION, ident, path, path, {n.lower() for n in names}, extra={"size": list(size)})
        if str(path) in before:
            item.candidates = _previous_candidates(before[str(path)])
        items.append(item)
    return folder, items


def _apply_names(items: list[AgeItem], given: dict[str, int]) -> None:
    """Put ages from the ages file / NAME=AGE pairs on the images whose names they give."""
    unmatched: list[str] = []
    for name, age in given.items():
        matched = [item for item in items if name.lower() in item.names]
        if not matched:
            unmatched.append(name)
        for item in matched:
            item.candidates["file"] = age
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else "")
        console.warn(
            f"ages given for names that match no image of the project: {shown}; check the spelling "
            "(a file name, its stem or the reference's id)."
        )


def _exif_candidate(item: AgeItem, birth: Any) -> None:
    item.candidates.pop("exif", None)
    if item.source is None or not item.source.is_file():
        item.exif_error = f"{item.label}: the original photo is no longer there to read its EXIF date"
        return
    try:
        age = sources.age_from_exif(item.source, birth)
    except SelfageError as exc:
        item.exif_error = str(exc).rstrip(".")
        return
    if age is not None:
        item.candidates["exif"] = age


# ---- the age estimator -------------------------------------------------------------------------------
def _has_age_before_estimate(item: AgeItem, order: list[str]) -> bool:
    for name in order:
        if name == ESTIMATE:
            return False
        if name in item.candidates:
            return True
        if name == "exif" and item.exif_error:
            return True  # the EXIF error is reported; an estimate does not paper over it
    return False


def _estimate_of(item: AgeItem, preference: tuple[str, ...] = ("dex", "builtin")) -> tuple[str, float] | None:
    """(estimator, value) of the item's estimate, by ``preference`` (default: DEX's, the paper's, else builtin's)."""
    for name in preference:
        if name in item.candidates:
            return name, float(item.candidates[name])
    return None


ESTIMATOR_PREFERENCE = ("dex", "builtin")


def _run_estimator_if_needed(
    project: Project,
    items: list[AgeItem],
    order: list[str],
    dex_weights: Path | None,
    preprocess: str,
    device: str,
    choice: str,
) -> tuple[str, ...]:
    """Estimate the ages the sources before ``estimate`` leave open (every image when --dex-weights is given).

    Returns the order in which recorded estimates are preferred: the estimator asked for explicitly
    first; with ``auto``, DEX's (an earlier DEX estimate is kept when only the builtin one could run).
    """
    from selfage_cli.ages.engine import estimator

    if ESTIMATE not in order or not items:
        return ESTIMATOR_PREFERENCE
    name = estimator.choose(choice, dex_weights, configured_dex_weights(project))
    explicit = choice != "auto"
    preference = (
        (name, *[other for other in ESTIMATOR_PREFERENCE if other != name]) if explicit else ESTIMATOR_PREFERENCE
    )

    def has_own(item: AgeItem) -> bool:  # with auto, a DEX estimate is kept when the builtin would run
        return name in item.candidates or (not explicit and name == "builtin" and "dex" in item.candidates)

    needing = [item for item in items if not _has_age_before_estimate(item, order) and not has_own(item)]
    if dex_weights is not None and name == "dex":
        needing = items  # weights given explicitly: estimate everything, for the conflict warnings too
    if not needing:
        return preference
    from selfage_cli.faces.engine.loading import load_image

    images = []
    for item in needing:
        try:
            images.append(load_image(item.image))  # upright: its EXIF orientation applied (--reg photos)
        except (OSError, SyntaxError, ValueError, SelfageError) as exc:
            raise SelfageError(
                f"{item.image}: cannot be read for the age estimate ({exc}); re-run `selfage align` or remove it."
            ) from None
    model = estimator.load(
        name,
        dex_weights=dex_weights,
        configured=configured_dex_weights(project),
        device=device,
        dex_preprocess=preprocess,
    )
    what = model.describe()
    label = f"DEX ({Path(what['weights']).name})" if name == "dex" else f"the builtin estimator ({what['package']})"
    console.info(f"Estimating {len(images)} age(s) with {label}.")
    for item, estimate in zip(needing, model.estimate(images), strict=True):
        item.candidates[name] = round(float(estimate.age), 2)
    return preference


# ---- choosing and checking ----------------------------------------------------------------------------
def _as_age(source: str, value: float) -> int:
    if source in ESTIMATOR_PREFERENCE:
        return int(min(max(round(float(value)), sources.MIN_AGE), sources.MAX_AGE))
    return int(value)


def _choose(
    items: list[AgeItem],
    order: list[str],
    preference: tuple[str, ...] = ("dex", "builtin"),
    ways_to_give_an_age: str = WAYS_TO_GIVE_AN_AGE,
) -> None:
    """Pick each image's age by priority; warn about conflicts; raise if any image has none."""
    missing: list[AgeItem] = []
    exif_errors: list[str] = []
    for item in items:
        blocked = False
        for name in order:
            if name == ESTIMATE:
                found = _estimate_of(item, preference)
                if found is not None:
                    item.age_source = found[0]
                    item.age = _as_age(found[0], found[1])
                    break
                continue
            if name in item.candidates:
                item.age = _as_age(name, item.candidates[name])
                item.age_source = name
                break
            if name == "exif" and item.exif_error:
                blocked = True  # the EXIF date is needed but unreadable: an error, not a silent fall-through
                exif_errors.append(item.exif_error)
                break
        if item.age is None:
            if not blocked:
                missing.append(item)
            continue
        if item.exif_error and "exif" in order:
            console.warn(f"{item.exif_error}; not needed, the age comes from {item.age_source}.")
        _warn_conflicts(item)
    problems: list[str] = []
    if exif_errors:
        problems.append(
            "; ".join(exif_errors[:5]) + (f" (and {len(exif_errors) - 5} more)" if len(exif_errors) > 5 else "")
        )
    if missing:
        listed = ", ".join(item.label for item in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        kinds = sorted({item.section for item in missing})
        problems.append(
            f"no age from any source ({'/'.join(order)}) for {len(missing)} {' and '.join(kinds)} "
            f"image(s): {listed}{more}; {ways_to_give_an_age}"
        )
    if problems:
        raise SelfageError(". ".join(problems) + ". Nothing was written to the manifest.")


def _warn_conflicts(item: AgeItem) -> None:
    assert item.age is not None and item.age_source is not None
    for name, value in item.candidates.items():
        if name == item.age_source:
            continue
        estimated = name in ESTIMATOR_PREFERENCE
        differs = abs(float(value) - item.age) > DEX_CONFLICT_YEARS if estimated else int(value) != item.age
        if differs:
            console.warn(
                f"{item.label}: age sources disagree: {item.age_source} says {item.age}, {name} says "
                f"{value:g}; using {item.age} ({item.age_source}). Use --prefer or NAME=AGE to choose."
            )


# ---- writing --------------------------------------------------------------------------------------------
def _write(
    project: Project, items: list[AgeItem], reg_folder: Path | None, dex_weights: Path | None, summary: StageSummary
) -> None:
    refs = {item.id: item for item in items if item.section == REFERENCES}
    reg_items = [item for item in items if item.section == REGULARISATION]
    with update_manifest(project) as typed:
        for entry in typed.references:
            item = refs.get(entry.id)
            if item is None:
                continue  # added by a concurrent `align`: labelled next time
            set_age_label(entry, item.age, item.age_source, item.candidates)
        if reg_folder is not None:
            previous = typed.regularisation
            if previous.images and (previous.generated or previous.folder != str(reg_folder)):
                what = "generated set" if previous.generated else f"folder {previous.folder}"
                console.warn(
                    f"--reg {reg_folder} replaces the regularisation set recorded before ({what}, "
                    f"{len(previous.images)} images); its files are left where they are."
                )
            images = []
            for item in reg_items:
                image = RegImage(id=item.id, source=str(item.source), aligned=None)
                set_age_label(image, item.age, item.age_source, item.candidates)
                for key, value in item.extra.items():
                    setattr(image, key, value)
                images.append(image)
            typed.regularisation = Regularisation(folder=str(reg_folder), generated=False, images=images)
        if dex_weights is not None:
            typed.config.dex_weights = str(Path(dex_weights).expanduser().resolve())
    counts: dict[str, int] = {}
    for item in items:
        summary.done.append(
            {
                "section": item.section,
                "id": item.id,
                "age": item.age,
                "age_source": item.age_source,
                "age_candidates": dict(item.candidates),
            }
        )
        counts[item.age_source or "?"] = counts.get(item.age_source or "?", 0) + 1
    for item in items:
        if item.section == REFERENCES:
            summary.lines.append(f"{item.id}: {item.age} ({item.age_source})")
    if reg_folder is not None:
        summary.lines.append(f"regularisation: {len(reg_items)} image(s) from {reg_folder} labelled")
    summary.lines.append(f"labelled {len(items)} image(s): " + ", ".join(f"{n} from {s}" for s, n in counts.items()))
    summary.data["by_source"] = counts
