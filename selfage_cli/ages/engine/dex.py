"""The DEX age classifier: the SAM project's VGG-16 with a 101-way age head.

The checkpoint is ``dex_age_classifier.pth`` published by the SAM project (yuval-alaluf/SAM): a dict
with a ``'state_dict'`` whose key names follow the layer table below, some with ``-`` where the
module names have ``_`` (the reference maps ``-`` to ``_`` before loading). It is a VGG-16 fine-tuned
on FFHQ-Aging; the age is the expectation of the softmax over the 101 classes,
``age = Σ_{j=0..100} j · softmax(logits)_j``, so it always lies in [0, 100].

Loading is safe: ``torch.load(..., weights_only=True)`` refuses any pickle that would need to run code,
and every tensor's name and shape is checked against the table before anything is loaded.

Preprocessing (input: RGB in [-1, 1]):

* ``antialias`` (default): resize to 256×256 with antialiasing (the checkpoint was fine-tuned on
  256-px FFHQ-Aging images), then bilinear without antialiasing to 224×224.
* ``reference``: the reference's direct bilinear resize to 224×224 without antialiasing (aliases on
  512-px inputs); kept for comparison.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from selfage_cli.errors import SelfageError
from selfage_cli.torch_files import CODE_REFUSED, CodeRefused, UnreadableTorchFile, first_line, load_plain

DEX_ENV = "SELFAGE_DEX_WEIGHTS"
DEX_FILE_NAME = "dex_age_classifier.pth"
NUM_AGES = 101
INPUT_SIZE = 224
ANTIALIAS_SIZE = 256
PREPROCESS_MODES = ("antialias", "reference")

# (name, in_channels, out_channels): 3×3 convolutions, padding 1, ReLU; a 2×2 max-pool ends each group.
CONV_GROUPS: tuple[tuple[tuple[str, int, int], ...], ...] = (
    (("conv1_1", 3, 64), ("conv1_2", 64, 64)),
    (("conv2_1", 64, 128), ("conv2_2", 128, 128)),
    (("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)),
    (("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512)),
    (("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)),
)
# (name, in_features, out_features): fc6 and fc7 with ReLU, fc8_101 gives the logits.
FC_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("fc6", 512 * 7 * 7, 4096),
    ("fc7", 4096, 4096),
    ("fc8_101", 4096, NUM_AGES),
)

MISSING_WEIGHTS_HELP = (
    "the DEX age classifier weights are needed: dex_age_classifier.pth, a VGG-16 age estimator fine-tuned on "
    "FFHQ-Aging that the SAM project (github.com/yuval-alaluf/SAM) publishes with its pretrained models; "
    "download it once and pass it with --dex-weights PATH or the environment variable SELFAGE_DEX_WEIGHTS "
    "(the project remembers a path given with --dex-weights)"
)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter name of the checkpoint (after ``-`` → ``_``) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for group in CONV_GROUPS:
        for name, cin, cout in group:
            shapes[f"{name}.weight"] = (cout, cin, 3, 3)
            shapes[f"{name}.bias"] = (cout,)
    for name, fin, fout in FC_LAYERS:
        shapes[f"{name}.weight"] = (fout, fin)
        shapes[f"{name}.bias"] = (fout,)
    return shapes


class DexAgeClassifier(nn.Module):
    """VGG-16 with a 101-way age head; module names match the SAM checkpoint's keys.

    ``forward`` takes RGB images in [-1, 1] of shape (B, 3, 224, 224) and returns the 101 logits;
    :meth:`ages` returns the expected age of each image.
    """

    def __init__(self) -> None:
        super().__init__()
        for group in CONV_GROUPS:
            for name, cin, cout in group:
                self.add_module(name, nn.Conv2d(cin, cout, kernel_size=3, padding=1))
        for name, fin, fout in FC_LAYERS:
            self.add_module(name, nn.Linear(fin, fout))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for group in CONV_GROUPS:
            for name, _, _ in group:
                x = F.relu(getattr(self, name)(x))
            x = self.pool(x)
        x = x.flatten(1)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8_101(x)

    def ages(self, x: torch.Tensor) -> torch.Tensor:
        """Expected age per image (float tensor of shape (B,), in [0, 100])."""
        return expected_age(self(x))


def expected_age(logits: torch.Tensor) -> torch.Tensor:
    """``Σ_j j · softmax(logits)_j`` over the last dimension (computed in fp32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    classes = torch.arange(logits.shape[-1], dtype=probs.dtype, device=probs.device)
    return probs @ classes


# ---- weights: where they are and how they load ---------------------------------------------------------
# A path the project remembers, and where it is written (for the message when it is not a file), e.g.
# ``("the project's config (/p/selfage.json)", "/w/dex.pth")``: looked up by the stage side
# (``manifest.configured_dex_weights``), so the engine never reads a project.
ConfiguredWeights = tuple[str, str | None]


def find_dex_weights(option: str | os.PathLike[str] | None, configured: ConfiguredWeights | None = None) -> Path | None:
    """The DEX checkpoint path from ``--dex-weights`` (``option``), ``$SELFAGE_DEX_WEIGHTS`` or ``configured``.

    Returns None when none of them names one; raises :class:`SelfageError` when the one named is not a file.
    """
    candidates: list[tuple[str, Any]] = [("--dex-weights", option), (f"${DEX_ENV}", os.environ.get(DEX_ENV) or None)]
    if configured is not None:
        candidates.append(configured)
    for origin, value in candidates:
        if not value:
            continue
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise SelfageError(f"{origin} names {path}, which is not a file; {MISSING_WEIGHTS_HELP}.")
        return path.resolve()
    return None


def resolve_dex_weights(option: str | os.PathLike[str] | None, configured: ConfiguredWeights | None = None) -> Path:
    """Like :func:`find_dex_weights`, but a missing path raises the error that says how to get one."""
    path = find_dex_weights(option, configured)
    if path is None:
        raise SelfageError(f"No DEX weights given: {MISSING_WEIGHTS_HELP}.")
    return path


def read_dex_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with ``-`` → ``_`` in key names, checked against the layer table.

    Accepts the SAM format (a dict with ``'state_dict'``) and a bare state dict. Raises
    :class:`SelfageError` for a file that is not a PyTorch checkpoint, a pickle that needs code to load
    (refused by ``weights_only=True`` before anything in it runs), and missing, unexpected or
    wrongly shaped tensors.
    """
    path = Path(path)
    try:
        data = load_plain(path)
    except CodeRefused:
        raise SelfageError(
            f"--dex-weights {path}: {CODE_REFUSED}. Use the genuine {DEX_FILE_NAME} from the SAM project "
            "(yuval-alaluf/SAM)."
        ) from None
    except (UnreadableTorchFile, OSError) as exc:
        detail = exc.detail if isinstance(exc, UnreadableTorchFile) else first_line(exc)
        raise SelfageError(
            f"--dex-weights {path} is not a readable PyTorch checkpoint ({detail}); nothing in it was run. The "
            f"file may be truncated or garbled: download {DEX_FILE_NAME} again from the SAM project "
            "(yuval-alaluf/SAM)."
        ) from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise SelfageError(
            f"--dex-weights {path} holds no state dict (expected a dict with 'state_dict', as the SAM project's "
            f"{DEX_FILE_NAME} has); pass that file."
        )
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key).replace("-", "_")
        if name.startswith("module."):
            name = name[len("module.") :]
        renamed[name] = value
    check_state_dict(renamed, path)
    return {k: v.float() for k, v in renamed.items()}


def check_state_dict(state: dict[str, Any], path: str | os.PathLike[str] = "checkpoint") -> None:
    """Raise :class:`SelfageError` unless ``state`` has exactly the table's tensors with their shapes."""
    shapes = expected_shapes()
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    problems: list[str] = []
    if missing:
        problems.append("missing " + _listing(missing))
    if unexpected:
        problems.append("unexpected " + _listing(unexpected))
    for key, shape in shapes.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {shape}")
    if problems:
        raise SelfageError(
            f"--dex-weights {path} is not the DEX VGG-16 age classifier ({'; '.join(problems[:6])}); pass the "
            f"SAM project's {DEX_FILE_NAME}."
        )


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_dex(path: str | os.PathLike[str], device: str | torch.device | None = "cpu") -> DexAgeClassifier:
    """A :class:`DexAgeClassifier` with the checkpoint's weights, in eval mode, on ``device``."""
    from selfage_cli.models import resolve_device

    state = read_dex_state_dict(path)
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    with torch.device("meta"):
        model = DexAgeClassifier()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False).to(device)


# ---- preprocessing ---------------------------------------------------------------------------------
def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """A PIL image (or H×W×3 / H×W uint8 array) → float tensor (3, H, W), RGB in [-1, 1]."""
    if isinstance(image, Image.Image):
        array = np.array(image.convert("RGB"), dtype=np.uint8)
    else:
        array = np.array(image, dtype=np.uint8)  # a writable copy
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        array = np.ascontiguousarray(array[..., :3])
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0


def check_preprocess(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`PREPROCESS_MODES`, else raise SelfageError naming --dex-preprocess."""
    if mode not in PREPROCESS_MODES:
        raise SelfageError(f"--dex-preprocess {mode!r} is not known; use {' or '.join(PREPROCESS_MODES)}.")
    return mode


def resize_for_dex(batch: torch.Tensor, mode: str = "antialias") -> torch.Tensor:
    """Resize a (B, 3, H, W) batch in [-1, 1] to 224×224 the way ``mode`` says (see the module doc)."""
    check_preprocess(mode)
    if mode == "antialias":
        batch = F.interpolate(
            batch, size=(ANTIALIAS_SIZE, ANTIALIAS_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
    return F.interpolate(batch, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)


def preprocess_images(images: Iterable[Image.Image | np.ndarray], mode: str = "antialias") -> torch.Tensor:
    """Images → a (B, 3, 224, 224) batch ready for the classifier (each resized on its own)."""
    tensors = [resize_for_dex(image_to_tensor(image).unsqueeze(0), mode) for image in images]
    return torch.cat(tensors, dim=0)


# ---- estimation ----------------------------------------------------------------------------------------
def estimate_ages(
    model: DexAgeClassifier,
    images: Sequence[Image.Image | np.ndarray],
    preprocess: str = "antialias",
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[float]:
    """DEX age estimate (a float in [0, 100]) of each image, in batches, with a progress bar."""
    check_preprocess(preprocess)
    if batch_size < 1:
        raise SelfageError(f"DEX batch size {batch_size} must be at least 1.")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    ages: list[float] = []

    def one_batch(chunk: Sequence[Image.Image | np.ndarray]) -> None:
        batch = preprocess_images(chunk, preprocess).to(device=device, dtype=dtype)
        ages.extend(float(a) for a in model.ages(batch).cpu())

    _in_batches(images, batch_size, one_batch, progress)
    return ages


def _in_batches(
    images: Sequence[Image.Image | np.ndarray],
    batch_size: int,
    one_batch: Callable[[Sequence[Image.Image | np.ndarray]], None],
    progress: bool,
) -> None:
    """Call ``one_batch`` on consecutive batches of ``images`` in inference mode, under a transient
    "DEX ages" progress bar when ``progress`` (and there are images)."""
    from selfage_cli import console

    def run_batches(advance: Callable[[int], None]) -> None:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                one_batch(chunk)
                advance(len(chunk))

    if progress and len(images) > 0:
        with console.progress(transient=True) as bar:
            task = console.new_task(bar, "DEX ages", total=len(images))
            run_batches(lambda n: bar.update(task, advance=n))
    else:
        run_batches(lambda n: None)


# ---- the estimator interface ----------------------------------------------------------------------
class DexEstimator:
    """DEX behind :class:`selfage_cli.ages.engine.estimator.AgeEstimator`: the same numbers as :func:`estimate_ages`,
    plus the spread of the 101-class distribution as the uncertainty. DEX has no gender."""

    name = "dex"

    def __init__(self, model: DexAgeClassifier, path: Path | None = None, preprocess: str = "antialias") -> None:
        self.model = model
        self.path = path
        self.preprocess = check_preprocess(preprocess)

    def describe(self) -> dict[str, Any]:
        return {"estimator": self.name, "weights": str(self.path) if self.path else None, "preprocess": self.preprocess}

    def estimate(self, images: Sequence[Image.Image | np.ndarray], progress: bool = True) -> list[Any]:
        """One estimate per image; the age is :func:`expected_age` of the same batches :func:`estimate_ages` runs."""
        from selfage_cli.ages.engine.estimator import AgeEstimate

        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out: list[AgeEstimate] = []

        def one_batch(chunk: Sequence[Image.Image | np.ndarray]) -> None:
            batch = preprocess_images(chunk, self.preprocess).to(device=device, dtype=dtype)
            logits = self.model(batch)
            ages = expected_age(logits)
            probs = torch.softmax(logits.float(), dim=-1)
            classes = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
            spread = (probs * (classes[None] - ages[:, None]) ** 2).sum(-1).sqrt()
            for age, sd, p in zip(ages.cpu(), spread.cpu(), probs.cpu(), strict=True):
                out.append(AgeEstimate(float(age), self.name, float(sd), float(p.max())))

        _in_batches(images, 16, one_batch, progress)
        return out
