"""The inversion cache: x_T and the per-step null embeddings of an inverted photo, in safetensors.

Null-text inversion is the slow half of an edit, and it depends only on the photo, the model and
the inversion settings — not on the target ages. Each inversion is stored under
``cache/inversions/<key>.safetensors``, where the key hashes everything the result depends on:
the image's sha256, the base model's fingerprint, the LoRA file's sha256 (or ``none``), the
inversion prompt, guidance, number of DDIM steps, inversion mode, inner steps, dtype and
resolution. Editing the same photo again (other ages, other prompt-to-prompt settings) reuses it.
A direct inversion (``--inversion direct``) also stores its T + 1 DDIM-inversion latents
(``trajectory``, (T + 1, C, h, w)), which its editing follows; the mode is part of the key.
Files are written atomically (temporary file + ``os.replace``), so a crash never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfage_cli import console
from selfage_cli.files import atomic_save

if TYPE_CHECKING:
    from selfage_cli.edit.engine.inversion import Inversion
    from selfage_cli.project import Project

CACHE_DIR = ("cache", "inversions")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class InversionKey:
    """Everything an inversion depends on; :attr:`digest` names its cache file."""

    image_sha256: str
    base_model: str  # fingerprint of the base model (not its name)
    lora_sha256: str  # "none" without a LoRA
    prompt: str
    guidance: float
    steps: int
    mode: str
    inner_steps: int
    dtype: str
    resolution: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "image_sha256": self.image_sha256,
            "base_model": self.base_model,
            "lora_sha256": self.lora_sha256,
            "prompt": self.prompt,
            "guidance": float(self.guidance),
            "steps": int(self.steps),
            "mode": self.mode,
            # negative-prompt inversion runs no optimisation: inner steps do not change it
            "inner_steps": int(self.inner_steps) if self.mode == "null-text" else 0,
            "dtype": self.dtype,
            "resolution": int(self.resolution),
        }

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class InversionCache:
    """Inversions of a project, stored as ``cache/inversions/<key>.safetensors``."""

    def __init__(self, project: Project):
        self.project = project

    @property
    def folder(self) -> Path:
        return self.project.root.joinpath(*CACHE_DIR)

    def path(self, key: InversionKey) -> Path:
        return self.folder / f"{key.digest}.safetensors"

    def relative(self, key: InversionKey) -> str:
        return "/".join((*CACHE_DIR, f"{key.digest}.safetensors"))

    def load(self, key: InversionKey) -> Inversion | None:
        """The cached inversion for ``key``, or None (missing, or unreadable: then it is recomputed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return _read(path, key)
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is recomputed, never fatal
            console.warn(f"{path}: cached inversion could not be read ({exc}); recomputing it.")
            return None

    def save(self, key: InversionKey, inversion: Inversion) -> Path:
        """Write ``inversion`` for ``key`` atomically; returns the file."""
        import torch
        from safetensors.torch import save_file

        self.project.writable_path(self.folder).mkdir(parents=True, exist_ok=True)  # never through a link outside
        path = self.project.writable_path(self.path(key))
        tensors = {
            "x_t": inversion.x_t.detach().to("cpu").float().contiguous(),
            "null_embeddings": inversion.null_embeddings.detach().to("cpu").float().contiguous(),
        }
        if inversion.mode == "direct" and inversion.trajectory is not None:
            tensors["trajectory"] = torch.cat([x.detach().to("cpu").float() for x in inversion.trajectory]).contiguous()
        metadata = {
            "key": json.dumps(key.to_json(), sort_keys=True),
            "mode": str(inversion.mode),
            "prompt": str(inversion.prompt),
            "steps": str(int(inversion.steps)),
            "guidance": repr(float(inversion.guidance)),
            "inner_steps_run": json.dumps([int(n) for n in (inversion.inner_steps_run or [])]),
            "seconds": repr(float(inversion.seconds)),
            "unet_runner": str(inversion.unet_runner),
            "learning_rates": json.dumps([float(x) for x in (getattr(inversion, "learning_rates", None) or [])]),
        }
        return atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read(path: Path, key: InversionKey) -> Inversion:
    from safetensors import safe_open

    from selfage_cli.edit.engine.inversion import Inversion

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        stored_key = json.loads(metadata.get("key", "{}"))
        if stored_key != key.to_json():
            raise ValueError("its key does not match the file name (hash collision or edited file)")
        x_t = handle.get_tensor("x_t")
        null_embeddings = handle.get_tensor("null_embeddings")
        names = set(handle.keys())
        trajectory = handle.get_tensor("trajectory") if "trajectory" in names else None
    if key.mode == "direct" and trajectory is None:
        raise ValueError("a direct inversion entry has no trajectory")
    return Inversion(
        x_t=x_t,
        null_embeddings=null_embeddings,
        mode=metadata["mode"],
        prompt=metadata["prompt"],
        steps=int(metadata["steps"]),
        guidance=float(metadata["guidance"]),
        inner_steps_run=[int(n) for n in json.loads(metadata.get("inner_steps_run", "[]"))],
        seconds=float(metadata.get("seconds", "0")),
        unet_runner=metadata.get("unet_runner", "unknown"),  # caches written before it was stored
        learning_rates=[float(x) for x in json.loads(metadata.get("learning_rates", "[]"))],
        trajectory=list(trajectory.split(1)) if trajectory is not None else None,
    )
