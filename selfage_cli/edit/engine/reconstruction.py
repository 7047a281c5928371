"""How well an edit's inversion held: the source branch's picture scored against the aligned input.

The prompt-to-prompt pass always carries the source branch, which re-creates the input from the
inversion; it is decoded with the target ages (``EditResult.images[0]``), so scoring it costs no UNet
call. :func:`score_reconstruction` gives its PSNR and SSIM against the aligned input (the eval stage's
definitions, :mod:`selfage_cli.eval.engine.metrics`) and, when the faces stage's dlib models are installed,
the dlib identity distance between the two faces (:mod:`selfage_cli.faces.engine.identity`; ``None`` without
the models or when either picture shows no face).

:func:`reconstruction_warning` flags an inversion that did not hold. The thresholds (docs/editing.md,
"Reconstruction check", says where they come from): SD 1.5's VAE alone reconstructs 256² COCO images
at 23.4 ± 3.8 dB PSNR and SSIM 0.69 ± 0.14, and 512² portraits at roughly 25–30 dB; null-text inversion
with prompt-to-prompt keeps ≈ 27 dB / SSIM ≈ 0.84 on PIE-Bench, plain DDIM inversion only ≈ 18 dB /
0.71 (Ju et al. 2024, Table 1). Below 20 dB or SSIM 0.6 the reconstruction is worse than a failed
(plain DDIM) inversion on an average photo and far below what the VAE allows; a dlib distance of 0.6
or more means dlib no longer sees the same person (its authors' threshold).
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from selfage_cli.eval.engine import metrics

PSNR_WARN_DB = 20.0
SSIM_WARN = 0.6
IDENTITY_WARN = 0.6  # dlib's same-person threshold (faces.identity.SAME_PERSON_THRESHOLD)


def identity_models_present() -> bool:
    """Whether dlib and the faces stage's model files (landmarks, face recognition) are installed."""
    try:
        import dlib  # noqa: F401

        from selfage_cli.faces.engine import dlib_models

        dlib_models.model_path(dlib_models.SHAPE_PREDICTOR_68)
        dlib_models.model_path(dlib_models.FACE_RECOGNITION)
    except Exception:  # noqa: BLE001 - ImportError, SelfageError (model file missing): identity not measured
        return False
    return True


def identity_distance(input_image: Image.Image, reconstruction: Image.Image) -> float | None:
    """dlib descriptor distance of the two faces; None without the models or when a face is not found."""
    if not identity_models_present():
        return None
    from selfage_cli.faces.engine.identity import descriptor_distance, face_descriptor

    source = face_descriptor(input_image.convert("RGB"))
    if source is None:
        return None
    rebuilt = face_descriptor(reconstruction.convert("RGB"))
    if rebuilt is None:
        return None
    return descriptor_distance(source, rebuilt)


def score_reconstruction(input_image: Image.Image, reconstruction: Image.Image, *, identity: bool = True) -> dict:
    """``{psnr, ssim, identity_distance}`` of the source branch's picture against the aligned input.

    The input is resized (Lanczos) to the reconstruction's size when they differ. ``psnr`` is in dB
    (``None`` for identical pictures: infinite), ``ssim`` on luminance, ``identity_distance`` as above.
    """
    reference = input_image.convert("RGB")
    if reference.size != reconstruction.size:
        reference = reference.resize(reconstruction.size, Image.Resampling.LANCZOS)
    psnr = metrics.psnr(reference, reconstruction)
    distance = identity_distance(reference, reconstruction) if identity else None
    return {
        "psnr": None if math.isinf(psnr) else round(psnr, 2),
        "ssim": round(metrics.ssim(reference, reconstruction), 4),
        "identity_distance": None if distance is None else round(distance, 4),
    }


def below_thresholds(scores: dict[str, Any]) -> list[str]:
    """The scores that fall below their thresholds, as short phrases (empty: the inversion held)."""
    problems = []
    if scores.get("psnr") is not None and scores["psnr"] < PSNR_WARN_DB:
        problems.append(f"PSNR {scores['psnr']:.1f} dB < {PSNR_WARN_DB:g}")
    if scores.get("ssim") is not None and scores["ssim"] < SSIM_WARN:
        problems.append(f"SSIM {scores['ssim']:.2f} < {SSIM_WARN:g}")
    if scores.get("identity_distance") is not None and scores["identity_distance"] >= IDENTITY_WARN:
        problems.append(f"identity distance {scores['identity_distance']:.2f} ≥ {IDENTITY_WARN:g}")
    return problems


def reconstruction_warning(photo: str, scores: dict[str, Any], mode: str) -> str | None:
    """One sentence naming the photo, what fell short and what to try; None when the inversion held."""
    problems = below_thresholds(scores)
    if not problems:
        return None
    if mode == "null-text":
        step = "more --inner-steps"
    elif mode == "direct":  # the source branch is exact in latent space: only the VAE and the model are left
        step = "a clearer, larger photo"
    else:
        step = "--inversion null-text (or direct) instead of a fast mode"
    return (
        f"{photo}: the inversion did not hold ({', '.join(problems)} for the source branch against the input), "
        f"so the edits may not look like this person; try {step}, and check that the LoRA was trained on this "
        "base model."
    )


def summary_text(scores: dict[str, Any] | None) -> str:
    """The report line's part: ``reconstruction 27.1 dB, SSIM 0.84, identity 0.31``."""
    if not scores:
        return ""
    psnr = "identical" if scores.get("psnr") is None else f"{scores['psnr']:.1f} dB"
    text = f"reconstruction {psnr}, SSIM {scores['ssim']:.2f}"
    if scores.get("identity_distance") is not None:
        text += f", identity {scores['identity_distance']:.2f}"
    return text
