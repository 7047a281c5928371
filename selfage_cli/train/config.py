"""Training options (:class:`TrainConfig`): the method's settings and the engineering switches.

Defaults are the SelfAge paper's configuration: 800 steps, batch 4 references + 4 regularisation
images, LoRA rank 16 (alpha = rank), lr 1e-6 constant, 3 references, prior weight 1.0, contrastive
weight 0.1, text-encoder LoRA on, the base model's native resolution (SD 1.5: 512 px), seed 42.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from selfage_cli.errors import SelfageError

# Options that define the trained LoRA (a resumed run keeps the recorded values of these).
METHOD_FIELDS = (
    "base_model",
    "steps",
    "batch_size",
    "rank",
    "lr",
    "num_refs",
    "prior_weight",
    "contrast_weight",
    "instance_prompt",
    "class_prompt",
    "train_text_encoder",
    "resolution",
    "seed",
    "gradient_accumulation",
)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Every option of ``selfage train`` (see docs/training.md)."""

    base_model: str | None = None  # None: the project's base model, else SD 1.5 (base_model.choose_base_model)
    steps: int = 800
    batch_size: int = 4
    rank: int = 16
    lr: float = 1e-6
    num_refs: int = 3
    prior_weight: float = 1.0
    contrast_weight: float = 0.1
    instance_prompt: str = "photo of sks person"
    class_prompt: str = "photo of person"
    train_text_encoder: bool = True
    resolution: int | None = None  # None: the base model's native resolution (SD 1.5: 512), set by run_train
    seed: int = 42
    gradient_accumulation: int = 1
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    compile: bool = False
    compile_mode: str = "reduce-overhead"  # torch.compile mode when compile is on (the fastest measured)
    cuda_graph: bool | None = None  # one CUDA graph per step: None wherever it works (engine/cuda_graph.py)
    latent_cache: bool = True
    validate_ages: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    temperature: float = 0.5  # NT-Xent temperature (the method's value)

    @property
    def alpha(self) -> int:
        """LoRA alpha: equal to the rank (scale 1)."""
        return self.rank

    def prompt(self, age: int, instance: bool = True) -> str:
        """``"photo of sks person as 34-year-old"`` (instance) or the class prompt with the age."""
        head = self.instance_prompt if instance else self.class_prompt
        return f"{head} as {int(age)}-year-old"

    def validation_ages(self) -> list[int]:
        """``--validate-ages`` parsed into integers (empty when not asked for)."""
        if not self.validate_ages:
            return []
        from selfage_cli.ages.engine.sources import parse_age_list

        return parse_age_list(str(self.validate_ages), "--validate-ages")

    def __post_init__(self) -> None:
        """Raise SelfageError (exit 2) for option values that cannot work (every config validates when it is
        built; ``dataclasses.replace`` checks a changed one again)."""
        positive = {
            "--steps": self.steps,
            "--batch-size": self.batch_size,
            "--rank": self.rank,
            "--num-refs": self.num_refs,
            "--gradient-accumulation": self.gradient_accumulation,
            "--keep-checkpoints": self.keep_checkpoints,
        }
        for option, value in positive.items():
            if int(value) < 1:
                raise SelfageError(f"{option} {value} must be at least 1; give a positive integer.")
        if not self.lr > 0:
            raise SelfageError(f"--lr {self.lr} must be positive, e.g. --lr 1e-6.")
        if self.checkpoint_every < 0:
            raise SelfageError(f"--checkpoint-every {self.checkpoint_every} must be 0 (off) or positive.")
        for option, value in (("--prior-weight", self.prior_weight), ("--contrast-weight", self.contrast_weight)):
            if value < 0:
                raise SelfageError(f"{option} {value} must not be negative.")
        if self.compile_mode not in COMPILE_MODES:
            raise SelfageError(
                f"--compile-mode {self.compile_mode!r} is not known; use one of {', '.join(COMPILE_MODES)}."
            )
        if self.resolution is not None and self.resolution < 1:
            raise SelfageError(f"--resolution {self.resolution} must be positive, e.g. --resolution 512.")
        # The multiple the resolution must be depends on the model: checked when it is loaded
        # (models.check_resolution in train/stage.py).
        if "{" in self.instance_prompt or "{" in self.class_prompt:
            raise SelfageError("--instance-prompt/--class-prompt: give only the part before ' as {age}-year-old'.")
        self.validation_ages()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> TrainConfig:
        """Rebuild from :meth:`to_json` output (unknown keys are ignored, missing ones take defaults)."""
        if isinstance(data, str):
            data = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_method_of(self, recorded: dict[str, Any]) -> TrainConfig:
        """This config with the method options replaced by a recorded run's (for ``--resume``)."""
        values = self.to_json()
        values.update({k: recorded[k] for k in METHOD_FIELDS if k in recorded})
        return TrainConfig.from_json(values)
