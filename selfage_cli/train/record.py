"""What a run leaves behind: the LoRA, its JSON sidecar and the manifest's Run entry, written by
:class:`RunRecorder` at checkpoints, at Ctrl-C and at the end (main process only).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from selfage_cli.files import atomic_write_json
from selfage_cli.manifest import META_NAME, WEIGHT_NAME, Run, find, upsert
from selfage_cli.manifest import update as update_manifest
from selfage_cli.project import Project, now_iso
from selfage_cli.train.config import TrainConfig
from selfage_cli.train.engine.data import TrainImage
from selfage_cli.train.engine.loop import LOSS_LOG, Trainer


class RunRecorder:
    """Writes the LoRA, its JSON and the manifest's Run entry (at checkpoints, interrupts and the end)."""

    def __init__(
        self,
        project: Project,
        name: str,
        run_dir: Path,
        config: TrainConfig,
        trainer: Trainer,
        refs: list[TrainImage],
        regs: list[TrainImage],
    ):
        from selfage_cli.models import model_fingerprint, pipeline_fingerprint

        self.pipeline_fingerprint = pipeline_fingerprint(SimpleNamespace(unet=trainer.unet))
        self.project, self.name, self.run_dir, self.config = project, name, run_dir, config
        self.trainer, self.refs, self.regs = trainer, refs, regs
        self.fingerprint = model_fingerprint(config.base_model)

    def metadata(self, finished: bool) -> dict[str, Any]:
        """The LoRA's JSON sidecar (``pytorch_lora_weights.json``)."""
        cfg = self.config
        return {
            "format": "selfage-lora",
            "version": 1,
            "base_model": cfg.base_model,
            "base_model_fingerprint": self.fingerprint,
            "pipeline_fingerprint": self.pipeline_fingerprint,
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "steps_done": self.trainer.step_done,
            "steps_total": cfg.steps,
            "finished": finished,
            "processes": self.trainer.accelerator.num_processes,
            "train_text_encoder": cfg.train_text_encoder,
            "resolution": cfg.resolution,
            "prediction_type": self.trainer.prediction_type,
            "instance_prompt": cfg.instance_prompt,
            "class_prompt": cfg.class_prompt,
            "prompt_template": f"{cfg.instance_prompt} as {{age}}-year-old",
            "prompts": [img.prompt for img in self.refs],
            "ages": [img.age for img in self.refs],
            "references": [img.to_json() for img in self.refs],
            "regularisation": {
                "count": len(self.regs),
                "ages": sorted({img.age for img in self.regs}),
                "files": [img.stored_as for img in self.regs],
            },
            "config": cfg.to_json(),
            "updated": now_iso(),
        }

    def record(self, finished: bool) -> dict[str, Any]:
        """Write the LoRA and its JSON, upsert the Run entry; returns it ({} off the main process)."""
        if not self.trainer.accelerator.is_main_process:
            return {}
        lora = self.trainer.save_lora(self.run_dir, WEIGHT_NAME)
        meta = self.run_dir / META_NAME
        atomic_write_json(meta, self.metadata(finished))
        rel = self.project.relative
        run = Run(
            name=self.name,
            run_dir=rel(self.run_dir),
            lora=rel(lora),
            config=self.config.to_json(),
            base_model=self.config.base_model,
            base_model_fingerprint=self.fingerprint,
            pipeline_fingerprint=self.pipeline_fingerprint,
            steps_done=self.trainer.step_done,
            steps_total=self.config.steps,
            finished=finished,
            processes=self.trainer.accelerator.num_processes,
            step_runner=self.trainer.step_runner,
            checkpoint_dir=rel(self.run_dir / "checkpoints"),
            loss_log=rel(self.run_dir / LOSS_LOG),
            references=[{"id": img.id, "age": img.age} for img in self.refs],
            updated=now_iso(),
        )
        with update_manifest(self.project) as manifest:
            previous = find(manifest.runs, self.name, key="name")
            if previous is not None and previous.validation_grid and not finished:
                run.validation_grid = previous.validation_grid
            upsert(manifest.runs, run, key="name")
        return run.to_dict()
