"""Which images a run trains on, read from the manifest as :class:`~selfage_cli.train.engine.data.TrainImage`.

* References: the manifest's aligned references that have an age, ordered by the source file name
  (then id); the first ``--num-refs`` are used.
* Regularisation: every labelled image of ``regularisation.images``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.manifest import ImageEntry, Manifest
from selfage_cli.project import Project
from selfage_cli.train.engine.data import TrainImage


def _sort_key(entry: ImageEntry) -> tuple[str, str]:
    name = Path(entry.source or entry.aligned or "").name
    return (name, entry.id)


def _typed(manifest: Manifest | dict[str, Any]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


def select_references(
    project: Project, manifest: Manifest | dict[str, Any], num_refs: int, instance_prompt: str
) -> list[TrainImage]:
    """The first ``num_refs`` aligned, labelled references by source file name (SelfageError if none)."""
    refs = [e for e in _typed(manifest).references if e.aligned]
    if not refs:
        raise SelfageError(
            "the project has no aligned references; pass your photos with `selfage train --refs DIR` "
            "(or run `selfage align DIR` and `selfage label-ages` first)."
        )
    labelled = [e for e in refs if e.age is not None]
    if not labelled:
        raise SelfageError(
            f"none of the project's {len(refs)} references has an age; name the photos like 34_beach.jpg, "
            "pass --ages-file or --birth-date with --refs, or run `selfage label-ages`."
        )
    if len(labelled) < len(refs):
        missing = ", ".join(e.id for e in refs if e.age is None)
        console.warn(f"references without an age are not used: {missing}; label them with `selfage label-ages`.")
    labelled.sort(key=_sort_key)
    chosen = labelled[:num_refs]
    if len(chosen) < num_refs:
        console.warn(
            f"--num-refs {num_refs} asked for, but only {len(chosen)} labelled reference(s) exist; training with those."
        )
    out = []
    for entry in chosen:
        age = int(round(float(entry.age)))
        out.append(
            TrainImage(
                entry.id, project.path(entry.aligned), age, f"{instance_prompt} as {age}-year-old", str(entry.aligned)
            )
        )
    return out


def select_regularisation(project: Project, manifest: Manifest | dict[str, Any], class_prompt: str) -> list[TrainImage]:
    """Every labelled regularisation image (SelfageError with the way to get some if there are none)."""
    images = _typed(manifest).regularisation.images
    hint = (
        "pass --reg DIR (a folder of other people's aligned faces, ages in file names or labelled by DEX), "
        "or run `selfage label-ages --reg DIR` or `selfage make-reg` first."
    )
    if not images:
        raise SelfageError(f"the project has no regularisation set; {hint}")
    out = []
    for entry in images:
        if entry.age is None:
            continue
        if entry.aligned:
            path, stored = project.path(entry.aligned), entry.aligned
        elif entry.source:
            path, stored = Path(entry.source), entry.source
        else:
            continue
        if not path.is_file():
            console.warn(f"regularisation image {path} is missing; skipped.")
            continue
        age = int(round(float(entry.age)))
        out.append(TrainImage(entry.id, path, age, f"{class_prompt} as {age}-year-old", stored))
    if not out:
        raise SelfageError(f"the project's regularisation images have no ages (or are missing); {hint}")
    return out
