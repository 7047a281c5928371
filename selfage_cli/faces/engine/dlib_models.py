"""The three dlib model files, found in face_recognition_models' folder and loaded once per process.

``face_recognition_models`` (PyPI) ships dlib's 68-point shape predictor, the MMOD CNN face detector
and the ResNet face-recognition model. Importing that package fails on current setuptools (it needs
``pkg_resources``), so its folder is located with :func:`importlib.util.find_spec` instead. Set
``SELFAGE_DLIB_MODELS`` to a folder holding the same ``.dat`` files to use other copies.

Every loader is cached per process (:func:`functools.cache`), so a process pool worker loads each model
once, not once per image.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from selfage_cli.errors import SelfageError

SHAPE_PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"
FACE_RECOGNITION = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_FIX = "pip install dlib-bin face_recognition_models (tested versions in constraints.txt)"


def models_folder() -> Path:
    """The folder with the dlib ``.dat`` files (``$SELFAGE_DLIB_MODELS`` or face_recognition_models')."""
    override = os.environ.get("SELFAGE_DLIB_MODELS")
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SelfageError(f"the face_recognition_models package (dlib's model files) is not installed; {INSTALL_FIX}.")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_path(name: str) -> Path:
    """Absolute path of one dlib model file; raises SelfageError with the fix when it is missing."""
    path = models_folder() / name
    if not path.is_file():
        raise SelfageError(f"{path}: dlib model file not found; {INSTALL_FIX}, or set SELFAGE_DLIB_MODELS.")
    return path


def _dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SelfageError(f"dlib is not installed ({exc}); {INSTALL_FIX}.") from exc
    return dlib


@functools.cache
def hog_detector() -> Any:
    """dlib's HOG + linear SVM frontal face detector (5 sub-detectors: frontal, profiles, rolled ±)."""
    return _dlib().get_frontal_face_detector()


@functools.cache
def cnn_detector() -> Any:
    """dlib's MMOD CNN face detector (slower on a CPU, finds harder faces)."""
    return _dlib().cnn_face_detection_model_v1(str(model_path(CNN_DETECTOR)))


@functools.cache
def shape_predictor() -> Any:
    """dlib's 68-landmark shape predictor (iBUG 300-W point order)."""
    return _dlib().shape_predictor(str(model_path(SHAPE_PREDICTOR_68)))


@functools.cache
def face_recognizer() -> Any:
    """dlib's ResNet face-recognition model: 128-d descriptors, same person when distance < 0.6."""
    return _dlib().face_recognition_model_v1(str(model_path(FACE_RECOGNITION)))


def preload(detector: str = "hog", descriptors: bool = False) -> None:
    """Load the models a worker will need now (process pool initialiser)."""
    (cnn_detector if detector == "cnn" else hog_detector)()
    shape_predictor()
    if descriptors:
        face_recognizer()
