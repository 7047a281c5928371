"""Which LoRA an edit uses, whether it belongs to the base model, and loading it into the pipeline.

Resolution order:

1. ``--no-lora``: none (the identifier is dropped from the prompts).
2. ``--lora PATH``: the ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``
   (a training run folder), or the name of a run recorded in the project. A named run is used even
   if it did not finish (with a warning). A LoRA without our ``pytorch_lora_weights.json`` beside it
   (e.g. one published by the paper's authors) is accepted with a warning.
3. Default: the project's latest *finished* training run (``manifest["runs"]``).

The JSON written by ``selfage train`` beside the weights names the base model it was trained on
(``base_model``, ``base_model_fingerprint``); a LoRA for another base model is refused (exit 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfage_cli import console
from selfage_cli.errors import ModelNotFoundError, SelfageError
from selfage_cli.manifest import META_NAME, WEIGHT_NAME, Run
from selfage_cli.manifest import load as load_manifest
from selfage_cli.project import Project, sha256_file

DEFAULT_IDENTIFIER = "sks"


@dataclass
class ResolvedLora:
    """A LoRA file chosen for an edit, with our JSON beside it when there is one."""

    path: Path  # absolute path of the .safetensors file
    origin: str  # how it was chosen: "default run NAME", "--lora PATH", "run NAME"
    meta: dict[str, Any] | None = None  # pytorch_lora_weights.json, None when absent
    run: str | None = None  # run name when it came from the manifest
    warnings: list[str] = field(default_factory=list)
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    @property
    def identifier(self) -> str:
        """The rare-token identifier the LoRA was trained with (``sks`` unless its JSON says otherwise)."""
        return identifier_from_meta(self.meta)

    def manifest_fields(self, project: Project) -> dict[str, Any]:
        """``lora`` (project-relative) or ``lora_source`` (absolute, outside the project)."""
        if self.path.resolve().is_relative_to(project.root):
            return {"lora": project.relative(self.path), "lora_sha256": self.sha256, "lora_run": self.run}
        return {"lora": None, "lora_source": str(self.path.resolve()), "lora_sha256": self.sha256, "lora_run": self.run}


def identifier_from_meta(meta: dict[str, Any] | None) -> str:
    """The identifier token from the LoRA's JSON (``identifier``, or the instance prompt), else ``sks``."""
    if not meta:
        return DEFAULT_IDENTIFIER
    if isinstance(meta.get("identifier"), str) and meta["identifier"].strip():
        return meta["identifier"].strip()
    candidates = [
        meta.get("instance_prompt"),
        (meta.get("config") or {}).get("instance_prompt"),
        (meta.get("prompts") or {}).get("instance") if isinstance(meta.get("prompts"), dict) else None,
    ]
    for prompt in candidates:
        if isinstance(prompt, str):
            match = re.fullmatch(r"\s*photo of (\S+) person(?: as .*)?\s*", prompt)
            if match:
                return match.group(1)
    return DEFAULT_IDENTIFIER


def resolve_lora(project: Project, lora: Path | str | None, no_lora: bool) -> ResolvedLora | None:
    """The LoRA to use (None with ``--no-lora``); raises SelfageError (exit 2) when there is none."""
    if no_lora:
        if lora is not None:
            raise SelfageError("--lora and --no-lora contradict each other; give one of them.")
        return None
    if lora is not None:
        return _from_option(project, Path(str(lora)).expanduser())
    return _default_run(project)


def _from_option(project: Project, option: Path) -> ResolvedLora:
    candidates = [option] if option.is_absolute() else [Path.cwd() / option, project.root / option]
    for candidate in candidates:
        if candidate.exists():
            file = _weights_file(candidate, option)
            meta = read_meta(file)
            run = _run_for(project, file)
            resolved = ResolvedLora(
                path=file.resolve(), origin=f"--lora {option}", meta=meta, run=run.name if run else None
            )
            _warn_meta(resolved)
            return resolved
    run = _find_run(project, str(option))
    if run is not None:
        file = project.path(run.lora)
        if not file.is_file():
            raise ModelNotFoundError(
                f"--lora {option}: run {run.name!r} records {run.lora}, which does not exist; "
                "train it again or pass another --lora."
            )
        resolved = ResolvedLora(path=file, origin=f"run {run.name}", meta=read_meta(file), run=run.name)
        _warn_meta(resolved)
        return resolved
    raise ModelNotFoundError(
        f"--lora {option}: no such file or folder (nor a training run of that name in {project.manifest_path}); "
        "pass the pytorch_lora_weights.safetensors file or its folder, or use --no-lora."
    )


def _weights_file(path: Path, option: Path) -> Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SelfageError(
                f"--lora {option} is not a .safetensors file; pass the LoRA weights "
                f"({WEIGHT_NAME}) or the folder that holds them."
            )
        return path
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(
            f"--lora {option} is a folder without {WEIGHT_NAME}; pass the LoRA file itself or a training run folder."
        )
    raise SelfageError(
        f"--lora {option} holds several .safetensors files ({', '.join(p.name for p in found[:4])}); "
        "pass the LoRA file itself."
    )


def read_meta(file: Path) -> dict[str, Any] | None:
    """Our JSON beside the LoRA file (``<stem>.json`` or ``pytorch_lora_weights.json``), or None."""
    for candidate in (file.with_suffix(".json"), file.parent / META_NAME):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise SelfageError(
                    f"{candidate} is not valid JSON ({exc}); restore it or remove it to use the LoRA unchecked."
                ) from exc
            if not isinstance(data, dict):
                raise SelfageError(f"{candidate} must hold a JSON object; restore it or remove it.")
            return data
    return None


def _warn_meta(resolved: ResolvedLora) -> None:
    if resolved.meta is None:
        resolved.warnings.append(
            f"{resolved.path}: no {META_NAME} beside it, so its base model cannot be checked; using it as given "
            f"(identifier '{DEFAULT_IDENTIFIER}')."
        )
    elif resolved.meta.get("finished") is False:
        resolved.warnings.append(
            f"{resolved.path}: the training run did not finish "
            f"({resolved.meta.get('steps_done', '?')} of {resolved.meta.get('steps_total', resolved.meta.get('steps', '?'))} "
            "steps); using it because you named it."
        )


def _runs(project: Project) -> list[Run]:
    """The project's training runs that record a LoRA (the train stage's entries, read through their type)."""
    return [run for run in load_manifest(project).runs if run.lora]


def _find_run(project: Project, name: str) -> Run | None:
    return next((run for run in _runs(project) if run.name == name), None)


def _run_for(project: Project, file: Path) -> Run | None:
    for run in _runs(project):
        try:
            if project.path(run.lora) == file.resolve():
                return run
        except SelfageError:
            continue
    return None


def _default_run(project: Project) -> ResolvedLora:
    runs = _runs(project)
    finished = [(index, run) for index, run in enumerate(runs) if run.finished is True]
    if not finished:
        unfinished = ", ".join(run.name for run in runs)
        detail = (
            (f" (run(s) {unfinished} did not finish: `selfage train --resume` completes one, or name it with --lora)")
            if runs
            else ""
        )
        raise ModelNotFoundError(
            f"{project.manifest_path}: no finished training run to take the LoRA from{detail}; train one with "
            "`selfage train --refs DIR`, pass --lora PATH (a LoRA file or run folder), or edit with the base model "
            "alone with --no-lora."
        )

    def order(item: tuple[int, Run]) -> tuple[str, int]:
        index, run = item
        return (str(run.get("finished_at") or run.updated or ""), index)

    _, run = max(finished, key=order)
    file = project.path(run.lora)
    if not file.is_file():
        raise ModelNotFoundError(
            f"{project.manifest_path}: the latest finished run {run.name!r} records {run.lora}, which does "
            "not exist; retrain it, pass --lora PATH, or use --no-lora."
        )
    meta = read_meta(file) or {}
    for key in ("base_model", "base_model_fingerprint", "finished"):  # the manifest entry completes a missing JSON
        meta.setdefault(key, run.get(key))
    return ResolvedLora(path=file, origin=f"latest finished run {run.name}", meta=meta, run=run.name)


def check_base_model(resolved: ResolvedLora, base_model: str) -> None:
    """Refuse (exit 2) a LoRA whose JSON records another base model than the one loaded.

    The JSON's ``base_model_fingerprint`` is compared with the content fingerprint of
    ``--base-model`` (:func:`selfage_cli.models.model_fingerprint`: the same weights match whether
    named by Hub id or folder). A LoRA recorded under the same name is accepted even when the
    fingerprint changed (the files were re-saved); a LoRA without a fingerprint gets a warning.
    """
    from selfage_cli.models import model_fingerprint

    meta = resolved.meta or {}
    recorded = meta.get("base_model_fingerprint")
    trained_on = meta.get("base_model")
    if not recorded:
        if trained_on and str(trained_on) != str(base_model):
            console.warn(
                f"{resolved.path}: its JSON names base model {trained_on} (no fingerprint to "
                f"compare), not --base-model {base_model}; using it anyway."
            )
        return
    ours = model_fingerprint(base_model)
    if str(recorded) == ours or (trained_on and str(trained_on) == str(base_model)):
        return
    raise SelfageError(
        f"{resolved.path}: this LoRA was trained on {trained_on or 'another base model'} (fingerprint {recorded}), "
        f"not on --base-model {base_model} (fingerprint {ours}); pass --base-model {trained_on or 'MODEL'}, "
        "another --lora, or --no-lora."
    )


def load_lora(pipe: Any, resolved: ResolvedLora) -> None:
    """Load the LoRA into the UNet and text encoder through diffusers' ``load_lora_weights``.

    diffusers logs a failed load as an error (every mismatched tensor, one line each) before raising;
    that log is silenced here and the failure said in one sentence."""
    import logging

    diffusers_log = logging.getLogger("diffusers")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.CRITICAL)
    try:
        pipe.load_lora_weights(str(resolved.path.parent), weight_name=resolved.path.name, adapter_name="selfage")
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad LoRA file for the user
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = (" ".join(lines[:2]) if lines and lines[0].endswith(":") else lines[0]) if lines else ""
        first = first[:320] or type(exc).__name__
        raise SelfageError(
            f"{resolved.path}: could not be loaded as a diffusers LoRA for this base model ({first}); "
            "check that it was trained on this --base-model, or use --no-lora."
        ) from exc
    finally:
        diffusers_log.setLevel(level)
    console.info(f"LoRA: {resolved.path} ({resolved.origin})")
