"""Training data: which references and regularisation images, their prompts, the batch order, and
the latent-distribution cache.

* References: the manifest's aligned references that have an age, ordered by the source file name
  (then id); the first ``--num-refs`` are used.
* Regularisation: every labelled image of ``regularisation.images``.
* Order: each "epoch" has L = max(#refs, #reg) items; item k of an epoch pairs reference
  ``perm_a[k] mod #refs`` with regularisation image ``perm_b[k] mod #reg``, where perm_a, perm_b are
  two random permutations of 0..L−1 drawn from (seed, epoch). So the references repeat cyclically,
  both sets are shuffled, and an epoch covers the larger set. Micro-batch m takes items
  m·B … m·B+B−1 of the endless sequence of epochs: a pure function of (seed, m), so a resumed run
  sees exactly the batches an uninterrupted one would.
* Random draws (latent sample, noise, timesteps) of micro-batch m on process r come from a generator
  seeded with :func:`draw_seed` (seed, r, m): also a pure function, whatever happened before.
* Batch layout: B reference images, then B regularisation images; prompts
  ``"{instance_prompt} as {age}-year-old"`` and ``"{class_prompt} as {age}-year-old"``.
* Latent cache: each image goes through the VAE encoder once; the latent distribution's mean and
  std are kept, and every step draws ``mean + std·ε`` — exactly what re-encoding would give.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.manifest import ImageEntry, Manifest


@dataclass(frozen=True)
class TrainImage:
    """One training image: where it is, its integer age, its prompt."""

    id: str
    path: Path
    age: int
    prompt: str
    stored_as: str  # the path as recorded (project-relative or absolute), for the run's JSON

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.stored_as, "age": self.age, "prompt": self.prompt}


def _sort_key(entry: ImageEntry) -> tuple[str, str]:
    name = Path(entry.source or entry.aligned or "").name
    return (name, entry.id)


def _typed(manifest: Manifest | dict[str, Any]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


def select_references(
    project: Any, manifest: Manifest | dict[str, Any], num_refs: int, instance_prompt: str
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


def select_regularisation(project: Any, manifest: Manifest | dict[str, Any], class_prompt: str) -> list[TrainImage]:
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


class BatchPlan:
    """Which reference and regularisation images make up micro-batch m (a pure function of seed, m)."""

    def __init__(self, num_refs: int, num_reg: int, batch_size: int, seed: int):
        self.num_refs, self.num_reg, self.batch_size, self.seed = num_refs, num_reg, batch_size, seed
        self.epoch_len = max(num_refs, num_reg)
        self._epochs: dict[int, tuple[list[int], list[int]]] = {}

    def epoch(self, index: int) -> tuple[list[int], list[int]]:
        """(reference indices, regularisation indices) of one epoch, each of length L."""
        if index not in self._epochs:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            perm_a = torch.randperm(self.epoch_len, generator=gen).tolist()
            perm_b = torch.randperm(self.epoch_len, generator=gen).tolist()
            self._epochs = {index: ([k % self.num_refs for k in perm_a], [k % self.num_reg for k in perm_b])}
        return self._epochs[index]

    def items(self, micro_batch: int) -> tuple[list[int], list[int]]:
        """Reference and regularisation indices (B each) of micro-batch ``micro_batch``."""
        refs, regs = [], []
        for k in range(micro_batch * self.batch_size, (micro_batch + 1) * self.batch_size):
            epoch, pos = divmod(k, self.epoch_len)
            a, b = self.epoch(epoch)
            refs.append(a[pos])
            regs.append(b[pos])
        return refs, regs


def draw_seed(seed: int, process: int, micro_batch: int) -> int:
    """The generator seed of micro-batch ``micro_batch`` on process ``process`` of a run seeded with
    ``seed``: distinct for every (process, micro-batch), and the same in a resumed run."""
    digest = hashlib.blake2b(f"{seed}/{process}/{micro_batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def load_pixels(path: Path, resolution: int, notes: dict[str, list[str]]) -> torch.Tensor:
    """An image as a 3×R×R tensor in [−1, 1], upright (its EXIF orientation applied, as everywhere:
    regularisation photos from ``--reg`` are read as they are); square images of another size are
    resized (noted), non-square ones are centre-cropped (noted)."""
    from selfage_cli.faces.errors import UnreadableImageError
    from selfage_cli.faces.loading import load_image

    try:
        image = load_image(path)
    except UnreadableImageError as exc:
        raise SelfageError(f"{path}: cannot be read as an image ({exc.problem}); remove it or replace it.") from exc
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        notes.setdefault("cropped", []).append(path.name)
    if image.size[0] != resolution:
        notes.setdefault("resized", []).append(f"{path.name} ({image.size[0]} px)")
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def report_image_notes(notes: dict[str, list[str]], resolution: int) -> None:
    """One warning per kind of adjustment made while loading images."""
    if notes.get("cropped"):
        console.warn(
            f"{len(notes['cropped'])} image(s) are not square and were centre-cropped "
            f"({', '.join(notes['cropped'][:5])}); align them with `selfage align` for best results."
        )
    if notes.get("resized"):
        console.warn(
            f"{len(notes['resized'])} image(s) are not {resolution}×{resolution} and were resized "
            f"({', '.join(notes['resized'][:5])}); align them at that size (`selfage align --size "
            f"{resolution}`) or pass the matching --resolution."
        )


class LatentSource:
    """Latents for training images, either from a cache of latent distributions or by re-encoding.

    ``sample(indices, generator)`` returns scaled latents (× VAE scaling factor) for those images.
    With ``cache=True`` each image is encoded exactly once (at construction); otherwise every call
    re-encodes the images through the VAE (the reference implementation's behaviour).
    """

    def __init__(
        self,
        vae: Any,
        images: list[TrainImage],
        resolution: int,
        device: torch.device,
        cache: bool = True,
        chunk: int = 8,
        autocast: Any = None,
    ):
        self.vae, self.device, self.cache = vae, device, cache
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._autocast = autocast
        notes: dict[str, list[str]] = {}
        self.pixels = torch.stack([load_pixels(img.path, resolution, notes) for img in images])
        report_image_notes(notes, resolution)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        if cache:
            means, stds = [], []
            for start in range(0, len(images), chunk):
                dist = self._encode(self.pixels[start : start + chunk])
                means.append(dist.mean.float())
                stds.append(dist.std.float())
            self.mean, self.std = torch.cat(means), torch.cat(stds)
            self.pixels = self.pixels[:0]  # no longer needed

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> Any:
        dtype = next(self.vae.parameters()).dtype
        pixels = pixels.to(self.device, dtype=dtype)
        if self._autocast is not None:
            with self._autocast():
                return self.vae.encode(pixels).latent_dist
        return self.vae.encode(pixels).latent_dist

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents (fp32) of the images at ``indices``, one fresh draw each."""
        if self.cache:
            assert self.mean is not None and self.std is not None
            index = torch.tensor(indices, device=self.mean.device)
            mean, std = self.mean[index], self.std[index]
        else:
            dist = self._encode(self.pixels[indices])
            mean, std = dist.mean.float(), dist.std.float()
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return (mean + std * eps.to(mean.device) - self.shift) * self.scaling
