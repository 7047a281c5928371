"""The training loop (:class:`Trainer`): one optimisation step of the SelfAge method, checkpoints,
resume, the loss log and the progress bar.

One step (per micro-batch; ``--gradient-accumulation`` micro-batches per step):

1. latents of B references then B regularisation images (from the latent cache or the VAE),
2. noise ε and timesteps t ~ U{0..T−1} per image, noisy latents from the model's DDPM schedule,
3. text embeddings of the age prompts (text encoder without attention mask; cached when frozen),
4. UNet prediction; target ε (epsilon models) or the velocity (v-prediction models),
5. loss = MSE_inst + w_c·C_inst + w_p·(MSE_prior + w_c·C_prior), all in fp32,
6. AdamW on the fp32 LoRA weights after clipping their gradient norm to 1.0.

The random draws of a micro-batch come from a ``torch.Generator`` on the device seeded with
``data.draw_seed(--seed, process, micro-batch)``, and the batch order is a pure function of (seed,
micro-batch), so a run resumed from a checkpoint continues exactly as an uninterrupted one would.

Under ``accelerate launch`` each process draws its own micro-batches (micro-batch m of process r is
item group m·N + r of the batch order) and gradients are averaged (DDP); the loss log holds the mean
over the processes, and only the main process writes (checkpoints, loss log).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.files import atomic_write_bytes, atomic_write_json, resolves_inside
from selfage_cli.processes import launched_processes
from selfage_cli.torch_files import save_plain
from selfage_cli.train.config import TrainConfig
from selfage_cli.train.engine.checkpoints import read_checkpoint
from selfage_cli.train.engine.contrastive import nt_xent_per_channel
from selfage_cli.train.engine.cuda_graph import GraphedStep, StepInputs, graph_wanted
from selfage_cli.train.engine.data import BatchPlan, LatentSource, TrainImage, draw_seed
from selfage_cli.train.engine.lora import (
    DIFFUSERS_LORA_FILE,
    add_lora,
    cast_lora_fp32,
    lora_inputs_uncast,
    lora_layers,
    lora_state,
    save_lora,
    trainable_parameters,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

CHECKPOINT_PREFIX = "step-"
LOSS_LOG = "loss.jsonl"
AT_ONCE_AFTER = 1.0  # seconds: a second Ctrl-C this long after the first stops mid-step


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a job scheduler, ``timeout``, a launcher) while training: stop after
    the current step, so that the checkpoint written then holds whole steps. A second Ctrl-C at least
    :data:`AT_ONCE_AFTER` seconds later stops at once (a launcher's echo of the first one does not)."""

    def __init__(self) -> None:
        self.requested_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
        elif signum == signal.SIGINT and now - self.requested_at >= AT_ONCE_AFTER:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Catch SIGINT and SIGTERM for the duration (main thread only; elsewhere Python's defaults)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def resolve_precision(config: TrainConfig) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype of the frozen weights, accelerate mixed-precision mode) for a config."""
    from selfage_cli.models import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        console.warn("--dtype fp16 is not supported for training on the CPU; using fp32.")
        dtype = torch.float32
    mode = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return device, dtype, mode


def make_accelerator(device: torch.device, mixed_precision: str, autocast_cache: bool = True) -> Any:
    """An ``accelerate.Accelerator`` for this device and precision (multi-GPU under ``accelerate launch``).

    ``autocast_cache=False`` turns off autocast's cache of cast weights (needed to record CUDA graphs).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import AutocastKwargs

    if device.type == "cuda" and device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)
    if "LOCAL_RANK" not in os.environ and PartialState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)  # single process: allow a new device/precision
    handlers = [] if autocast_cache else [AutocastKwargs(cache_enabled=False)]
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision, kwargs_handlers=handlers)


class Trainer:
    """Trains LoRA adapters on a pipeline's UNet (and text encoder) with the SelfAge objective.

    ``step()`` runs one optimisation step and returns its loss terms; ``fit()`` runs to
    ``config.steps`` with progress, loss log and checkpoints; ``save_checkpoint``/``load_checkpoint``
    hold everything needed to continue bit-identically.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        config: TrainConfig,
        refs: list[TrainImage],
        regs: list[TrainImage],
        run_dir: Path | None = None,
        accelerator: Any = None,
    ):
        from diffusers import DDPMScheduler

        if config.resolution is None:  # the default: the base model's native resolution
            from selfage_cli.models import native_resolution

            config = dataclasses.replace(config, resolution=native_resolution(pipe))
        self.config, self.refs, self.regs, self.run_dir = config, refs, regs, run_dir
        device, self.weight_dtype, mixed = resolve_precision(config)
        processes = accelerator.num_processes if accelerator is not None else launched_processes()
        self.use_graph = graph_wanted(config, device.type, self.weight_dtype, processes)
        self.accelerator = accelerator or make_accelerator(device, mixed, autocast_cache=not self.use_graph)
        self.device = self.accelerator.device
        acc = self.accelerator
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (LoRA grads, loss)
            torch.backends.cudnn.allow_tf32 = True

        self.unet, self.vae, self.tokenizer = pipe.unet, pipe.vae, pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.train_text = bool(config.train_text_encoder)
        self.vae.requires_grad_(False)
        add_lora(self.unet, self.text_encoder if self.train_text else None, config.rank, config.seed)
        if not self.train_text:
            self.text_encoder.requires_grad_(False)
        for module in (self.unet, self.vae, self.text_encoder):
            if module.dtype != self.weight_dtype:
                module.to(dtype=self.weight_dtype)
            module.to(self.device)
        cast_lora_fp32(self.unet, self.text_encoder if self.train_text else None)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text:
                self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.vae.eval()
        self.text_encoder.train(self.train_text)

        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SelfageError(
                f"--base-model: prediction type {self.prediction_type!r} is not supported; "
                "use an SD 1.x/2.x model (epsilon or v-prediction)."
            )
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)

        self.params = trainable_parameters(self.unet, self.text_encoder if self.train_text else None)
        # Under autocast the LoRA inputs need no cast to fp32 (lora.lora_inputs_uncast): same numbers, fewer copies.
        self.uncast_lora = lora_layers(self.unet, self.text_encoder) if mixed != "no" else []
        self.optimizer = self._make_optimizer()
        if self.train_text:
            self.unet_fwd, self.text_fwd, self.optimizer = acc.prepare(self.unet, self.text_encoder, self.optimizer)
        else:
            self.unet_fwd, self.optimizer = acc.prepare(self.unet, self.optimizer)
            self.text_fwd = self.text_encoder
        if config.compile:
            self.unet_fwd = torch.compile(self.unet_fwd, mode=config.compile_mode)

        images = refs + regs
        self.plan = BatchPlan(len(refs), len(regs), config.batch_size, config.seed)
        autocast = acc.autocast if mixed != "no" else None
        self.latents = LatentSource(
            self.vae, images, config.resolution, self.device, cache=config.latent_cache, autocast=autocast
        )
        self._prepare_prompts(images)

        self.generator = torch.Generator(device=self.device)  # seeded per micro-batch (draw_seed)
        self.step_done = 0
        self.last: dict[str, float] = {}
        self.graphed: GraphedStep | None = GraphedStep(self) if self.use_graph else None
        self.released_runner = "eager"  # how the steps ran, kept when the graph is released
        self.stop = StopRequest()
        self.stopping = False  # some process was asked to stop: every process stops after this step

    # ---- set-up ----------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        kwargs = {"lr": self.config.lr, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
        if self.config.use_8bit_adam:
            try:
                import bitsandbytes as bnb  # type: ignore[import-not-found]
            except ImportError as exc:
                raise SelfageError(
                    "--use-8bit-adam needs bitsandbytes (CUDA); `pip install bitsandbytes` or leave the option out."
                ) from exc
            return bnb.optim.AdamW8bit(self.params, **kwargs)
        if self.device.type == "cuda":
            kwargs["fused"] = True  # one kernel for all LoRA tensors
            kwargs["capturable"] = self.use_graph  # step count on the GPU: recordable
        return torch.optim.AdamW(self.params, **kwargs)

    def _prepare_prompts(self, images: list[TrainImage]) -> None:
        """Token ids per image; with a frozen text encoder, one embedding per distinct prompt."""
        prompts = sorted({img.prompt for img in images})
        self.prompt_index = torch.tensor([prompts.index(img.prompt) for img in images], device=self.device)
        self.token_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        self.prompt_cache: torch.Tensor | None = None
        if not self.train_text:
            with torch.no_grad(), self.accelerator.autocast():
                self.prompt_cache = self.text_encoder(self.token_ids)[0].detach()

    def encode_prompts(self, prompt_rows: torch.Tensor) -> torch.Tensor:
        """Text embeddings of the prompts with these indices (``StepInputs.prompt_rows``)."""
        if self.prompt_cache is not None:
            return self.prompt_cache[prompt_rows]
        return self.text_fwd(self.token_ids[prompt_rows])[0]  # no attention mask, as SD 1.x was trained

    # ---- the method ------------------------------------------------------------------------------
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The SelfAge loss of a batch laid out as [B instance | B prior] (fp32)."""
        cfg = self.config
        pred, target = pred.float(), target.float()
        pred_inst, pred_prior = pred.chunk(2)
        target_inst, target_prior = target.chunk(2)
        mse_inst = F.mse_loss(pred_inst, target_inst)
        mse_prior = F.mse_loss(pred_prior, target_prior)
        zero = pred.new_zeros(())
        c_inst = nt_xent_per_channel(pred_inst, target_inst, cfg.temperature) if cfg.contrast_weight else zero
        c_prior = nt_xent_per_channel(pred_prior, target_prior, cfg.temperature) if cfg.contrast_weight else zero
        total = mse_inst + cfg.contrast_weight * c_inst + cfg.prior_weight * (mse_prior + cfg.contrast_weight * c_prior)
        parts = {"mse_inst": mse_inst, "c_inst": c_inst, "mse_prior": mse_prior, "c_prior": c_prior}
        return total, {k: v.detach() for k, v in parts.items()}  # tensors: no device sync here

    def batch_indices(self, micro_batch: int) -> list[int]:
        """Image indices (references first, then regularisation) of one micro-batch."""
        acc = self.accelerator
        ref_idx, reg_idx = self.plan.items(micro_batch * acc.num_processes + acc.process_index)
        return ref_idx + [len(self.refs) + i for i in reg_idx]

    def step_inputs(self, micro_batch: int) -> StepInputs:
        """The random draws and tensors of one micro-batch (everything before the models run)."""
        indices = self.batch_indices(micro_batch)
        gen = self.generator.manual_seed(draw_seed(self.config.seed, self.accelerator.process_index, micro_batch))
        latents = self.latents.sample(indices, gen)
        noise = torch.randn(latents.shape, generator=gen, device=gen.device, dtype=torch.float32).to(latents.device)
        timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=gen, device=gen.device).to(
            latents.device
        )
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        rows = self.prompt_index[torch.tensor(indices, device=self.device)]
        return StepInputs(noisy=noisy, timesteps=timesteps, target=target, prompt_rows=rows)

    def forward_loss(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Text encoder and UNet on a micro-batch's inputs → the SelfAge loss and its terms."""
        with self.accelerator.autocast(), lora_inputs_uncast(self.uncast_lora):
            hidden = self.encode_prompts(inputs.prompt_rows)
            pred = self.unet_fwd(inputs.noisy, inputs.timesteps, hidden, return_dict=False)[0]
        return self.loss(pred, inputs.target)

    def micro_step(self, micro_batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.forward_loss(self.step_inputs(micro_batch))

    def optimise(self, inputs: StepInputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One single-micro-batch step: loss, backward, clipping, AdamW; (loss terms, gradient norm).

        No host sync (tested): this is what :class:`~selfage_cli.train.engine.cuda_graph.GraphedStep` records
        as one CUDA graph. Gradients are left in place (the eager caller drops them; a recorded
        graph overwrites them at every replay).
        """
        loss, parts = self.forward_loss(inputs)
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return {"loss": loss.detach(), **parts}, torch.as_tensor(grad_norm)

    def eager_step(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimisation step run op by op (``gradient_accumulation`` micro-batches)."""
        acc, ga = self.accelerator, self.config.gradient_accumulation
        totals: dict[str, torch.Tensor] = {}
        for micro in range(ga):
            with contextlib.ExitStack() as stack:
                if micro < ga - 1 and acc.num_processes > 1:  # only the last micro-batch syncs gradients
                    stack.enter_context(acc.no_sync(self.unet_fwd))
                    if self.train_text:
                        stack.enter_context(acc.no_sync(self.text_fwd))
                loss, parts = self.micro_step(self.step_done * ga + micro)
                acc.backward(loss / ga)
            for key, value in {"loss": loss.detach(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value / ga
        grad_norm = acc.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals, torch.as_tensor(grad_norm)

    def _training_mode(self) -> None:
        """Put the trained models in training mode, if they are not (``Module.train()`` walks every
        submodule: ~2,600 of them in SD 1.5, some 10–20 ms of Python when done every step)."""
        models = [self.unet_fwd] + ([self.text_fwd] if self.train_text else [])
        for model in models:
            if not model.training:
                model.train()

    def step(self) -> dict[str, float]:
        """One optimisation step; returns its loss terms, gradient norm and seconds.

        Replayed from a CUDA graph where the set-up allows it, unless ``config.cuda_graph`` is False
        (:mod:`selfage_cli.train.engine.cuda_graph`), else run eagerly.
        """
        start = time.perf_counter()
        self._training_mode()
        if self.graphed is not None and self.graphed.failure is None:
            totals, grad_norm = self.graphed.step(self.step_inputs(self.step_done))
        else:
            totals, grad_norm = self.eager_step()
        self.step_done += 1
        names = list(totals)
        values = torch.stack([totals[k].float() for k in names] + [grad_norm.float().to(self.device)])
        several = self.accelerator.num_processes > 1
        if several:  # the mean over every process's micro-batches, and whether any process must stop
            asked = torch.tensor([float(self.stop.requested)], device=values.device)
            values = self.accelerator.reduce(torch.cat([values, asked]), reduction="mean")
        numbers = values.tolist()  # the step's only device sync
        self.stopping = numbers.pop() > 0 if several else self.stop.requested
        self.last = {
            "step": self.step_done,
            **dict(zip(names, numbers[:-1], strict=True)),
            "grad_norm": numbers[-1],
            "lr": self.config.lr,
            "seconds": time.perf_counter() - start,
        }
        return self.last

    # ---- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-NNNNNN atomically (LoRA weights, optimiser, RNG, step); keep the last N."""
        if self.run_dir is None or not self.accelerator.is_main_process:
            return None
        root = self.checkpoint_root
        if not resolves_inside(root, self.run_dir):  # a symbolic link out of the run folder: never written through
            raise SelfageError(
                f"{root} leads outside the run folder {self.run_dir} (a symbolic link); nothing was written there: "
                "remove the link and resume."
            )
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{self.step_done:06d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:  # a failed write (a full disk) leaves no partial checkpoint behind
            self._write_checkpoint(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.is_symlink():  # a link is replaced, never followed
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def _write_checkpoint(self, tmp: Path) -> None:
        """The checkpoint's files, written into the (new, empty) folder ``tmp`` and fsynced."""
        from safetensors.torch import save

        # Serialised in memory and written by Python: a full disk is an OSError with its errno.
        atomic_write_bytes(
            tmp / "unet.safetensors", save({k: v.contiguous().cpu() for k, v in lora_state(self.unet).items()})
        )
        if self.train_text:
            atomic_write_bytes(
                tmp / "text_encoder.safetensors",
                save({k: v.contiguous().cpu() for k, v in lora_state(self.text_encoder).items()}),
            )
        save_plain(self.optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}  # the training draws need none: draw_seed
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_plain(rng, tmp / "rng.pt")
        state = {"step": self.step_done, "processes": self.accelerator.num_processes, "config": self.config.to_json()}
        atomic_write_json(tmp / "state.json", state, indent=None)
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())

    def _prune(self) -> None:
        done = list_checkpoints(self.checkpoint_root)
        for old in done[: max(0, len(done) - self.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> None:
        """Restore LoRA weights, optimiser state, RNG state and the step count from a checkpoint."""
        data = read_checkpoint(folder, text_encoder=self.train_text)  # every file read and checked first

        def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))

        restore(self.unet, data.unet)
        if self.train_text and data.text_encoder is not None:
            restore(self.text_encoder, data.text_encoder)
        # Read with weights_only=True (torch_files.load_plain): optimiser state dicts (tensors, numbers,
        # tuples) and RNG byte tensors load without unpickling arbitrary objects. Read to the CPU:
        # load_state_dict moves the state to each parameter's device (a process's device name, e.g.
        # "cpu:0" under accelerate, is no storage location torch.load knows).
        self.optimizer.load_state_dict(data.optimizer)
        for group in self.optimizer.param_groups:  # as this run needs it, not as the checkpoint's run had it
            if "capturable" in group:
                group["capturable"] = self.use_graph
        rng = data.rng
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        state = data.state
        self.step_done = int(state["step"])
        before, now = int(state.get("processes", 1)), self.accelerator.num_processes
        if before != now:
            console.warn(
                f"{folder.name} was written by a run of {before} process(es) and continues with {now}: each "
                f"step now averages {now} micro-batch(es), so the rest of the run differs from an uninterrupted one."
            )

    def save_lora(self, folder: Path, weight_name: str = DIFFUSERS_LORA_FILE) -> Path:
        return save_lora(folder, self.unet, self.text_encoder if self.train_text else None, weight_name)

    # ---- the loop --------------------------------------------------------------------------------
    def on_step_end(self, stats: dict[str, float]) -> None:
        """Hook called after every step (tests raise KeyboardInterrupt here to simulate Ctrl-C)."""

    def fit(self, on_checkpoint: Callable[[Path | None], None] | None = None) -> None:
        """Train to ``config.steps`` with a progress bar, the loss log and periodic checkpoints.

        Ctrl-C or SIGTERM ends the loop after the current step (:class:`StopRequest`; with several
        processes, after the step at which any of them was asked, the same step for all) with a
        KeyboardInterrupt, which propagates to the caller, which writes the interrupt checkpoint.
        """
        cfg = self.config
        rate = None
        with contextlib.ExitStack() as stack:
            log = None
            if self.run_dir is not None and self.accelerator.is_main_process:
                log = stack.enter_context(open(self.run_dir / LOSS_LOG, "a", encoding="utf-8"))
            stack.enter_context(self.stop.listening())
            bar = stack.enter_context(console.progress())
            task = console.new_task(bar, "train", total=cfg.steps)
            bar.update(task, completed=self.step_done)
            while self.step_done < cfg.steps:
                stats = self.step()
                rate = 1.0 / stats["seconds"] if rate is None else 0.9 * rate + 0.1 / stats["seconds"]
                if log is not None:
                    log.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}))
                    log.write("\n")
                    log.flush()
                bar.update(
                    task, completed=self.step_done, status=f"loss {stats['loss']:.4f} lr {cfg.lr:.1e} {rate:.2f} it/s"
                )
                self.on_step_end(stats)
                if self.stopping and self.step_done < cfg.steps:
                    raise KeyboardInterrupt
                if cfg.checkpoint_every and self.step_done % cfg.checkpoint_every == 0 and self.step_done < cfg.steps:
                    path = self.save_checkpoint()
                    if on_checkpoint is not None:
                        on_checkpoint(path)
        self.release_graph()

    @property
    def step_runner(self) -> str:
        """How this session's steps ran: ``cuda-graph`` (replayed from the recorded step, no fallback) or ``eager``."""
        return self.graphed.runner if self.graphed is not None else self.released_runner

    def release_graph(self) -> None:
        """Drop the recorded step (``--cuda-graph``) and its gradients: their GPU memory is freed for
        what follows training (validation renders); a later ``step()`` runs eagerly."""
        if self.graphed is not None:
            self.released_runner = self.graphed.runner
            self.graphed = None
            self.optimizer.zero_grad(set_to_none=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def truncate_loss_log(path: Path, step: int) -> None:
    """Drop loss-log lines after ``step`` (steps lost to an interruption are logged again on resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
