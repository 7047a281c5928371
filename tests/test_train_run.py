"""Training on the tiny model (CPU): weights change as they should, the VAE encodes each image once,
the saved LoRA loads into plain diffusers, and an interrupted run resumes bit-identically."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfage_cli import console
from selfage_cli.errors import EXIT_INTERRUPTED, InterruptedRun, SelfageError
from selfage_cli.project import Project, find
from selfage_cli.train.config import TrainConfig
from selfage_cli.train.engine.loop import Trainer
from selfage_cli.train.stage import run_train

REF_AGES = (30, 40, 50)
REG_AGES = (8, 25, 65, 80)


def make_train_project(root: Path, portraits: list[Path], size: int = 128) -> Project:
    """A project with 3 aligned, labelled references and 4 labelled regularisation images."""
    project = Project(root)
    faces = [Image.open(p).convert("RGB") for p in portraits]
    faces = [f.crop((0, 0, min(f.size), min(f.size))).resize((size, size)) for f in faces]
    (root / "refs" / "aligned").mkdir(parents=True, exist_ok=True)
    (root / "reg").mkdir(parents=True, exist_ok=True)
    with project.update() as manifest:
        for i, age in enumerate(REF_AGES):
            path = root / "refs" / "aligned" / f"{age}_me.png"
            faces[0].rotate(5 * i).save(path)
            manifest["references"].append(
                {
                    "id": f"{age}_me",
                    "source": f"/photos/{age}_me.jpg",
                    "aligned": project.relative(path),
                    "age": age,
                    "age_source": "filename",
                }
            )
        for i, age in enumerate(REG_AGES):
            path = root / "reg" / f"{age}_other.png"
            faces[1].rotate(-7 * i).save(path)
            manifest["regularisation"]["images"].append(
                {"id": f"{age}_other", "source": str(path), "age": age, "age_source": "filename"}
            )
        manifest["regularisation"]["folder"] = str(root / "reg")
    return project


def tiny_config(model: Path, **overrides: Any) -> TrainConfig:
    values = dict(
        base_model=str(model),
        steps=3,
        batch_size=2,
        rank=4,
        lr=1e-2,
        resolution=128,
        checkpoint_every=2,
        keep_checkpoints=2,
        device="cpu",
        dtype="fp32",
        seed=3,
    )
    values.update(overrides)
    return TrainConfig(**values)


def run(project: Project, config: TrainConfig, name: str, **kwargs: Any):
    args = dict(refs=None, reg=None, birth_date=None, ages_file=None, run_name=name, resume=False, force=False)
    args.update(kwargs)
    return run_train(project, config, **args)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path
) -> Iterator[dict[str, Any]]:
    """One 3-step run with a spy on the VAE encoder and the trained pipeline captured."""
    from diffusers import AutoencoderKL

    import selfage_cli.models as models

    project = make_train_project(tmp_path_factory.mktemp("train") / "proj", [astronaut_path, hopper_path])
    encoded: list[torch.Tensor] = []
    captured: dict[str, Any] = {}
    real_encode, real_load = AutoencoderKL.encode, models.load_pipeline

    def spy_encode(self, x, *args, **kwargs):
        encoded.append(x.detach().clone())
        return real_encode(self, x, *args, **kwargs)

    def capture_load(*args, **kwargs):
        captured["pipe"] = real_load(*args, **kwargs)
        return captured["pipe"]

    def capture_trainer(self, stats):
        captured["trainer"] = self
        captured.setdefault("losses", []).append(stats["loss"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoencoderKL, "encode", spy_encode)
        mp.setattr(models, "load_pipeline", capture_load)
        mp.setattr(Trainer, "on_step_end", capture_trainer)
        mp.setattr("selfage_cli.train.engine.validate.VALIDATION_STEPS", 2)
        summary = run(project, tiny_config(tiny_model_dir, validate_ages="20,60"), "full")
    yield {"project": project, "summary": summary, "encoded": encoded, **captured}


def test_few_steps_train_and_record_the_run(trained: dict[str, Any]) -> None:
    project, summary = trained["project"], trained["summary"]
    assert summary.exit_code == 0
    losses = trained["losses"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    run_dir = project.root / "runs" / "full"
    log = [json.loads(line) for line in (run_dir / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    assert [row["loss"] for row in log] == pytest.approx(losses, abs=1e-5)
    meta = json.loads((run_dir / "pytorch_lora_weights.json").read_text())
    assert meta["finished"] is True and meta["steps_done"] == 3 and meta["rank"] == meta["alpha"] == 4
    assert meta["ages"] == list(REF_AGES)
    assert meta["prompts"] == [f"photo of sks person as {a}-year-old" for a in REF_AGES]
    assert meta["base_model_fingerprint"]
    entry = find(project.read()["runs"], "full", key="name")
    assert entry["finished"] is True and entry["steps_done"] == entry["steps_total"] == 3
    assert entry["step_runner"] == "eager"  # on a CPU; the CUDA-graph step needs a GPU
    assert entry["lora"] == "runs/full/pytorch_lora_weights.safetensors"
    assert entry["validation_grid"] == "runs/full/validation.png"
    with Image.open(project.path(entry["validation_grid"])) as grid:
        assert grid.size[0] == 2 * 128
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_batch_is_references_then_regularisation_with_age_prompts(trained: dict[str, Any]) -> None:
    trainer: Trainer = trained["trainer"]
    n_refs = len(trainer.refs)
    for micro in range(3):
        indices = trainer.batch_indices(micro)
        assert all(i < n_refs for i in indices[:2]) and all(i >= n_refs for i in indices[2:])
    images = trainer.refs + trainer.regs
    prompts = [images[i].prompt for i in trainer.batch_indices(0)]
    assert prompts[0].startswith("photo of sks person as ") and prompts[2].startswith("photo of person as ")
    assert {img.prompt for img in trainer.regs} == {f"photo of person as {a}-year-old" for a in REG_AGES}


def test_lora_weights_change_and_base_weights_do_not(trained: dict[str, Any], tiny_pipe: Any) -> None:
    pipe, fresh = trained["pipe"], tiny_pipe
    for part in ("unet", "text_encoder"):
        trained_params = dict(getattr(pipe, part).named_parameters())
        lora_b = [p for n, p in trained_params.items() if "lora_B" in n]
        assert lora_b and all(p.dtype == torch.float32 for p in lora_b)
        assert max(float(p.detach().abs().max()) for p in lora_b) > 0, f"{part} LoRA did not change (B starts at 0)"
        base = {n.replace(".base_layer", ""): p for n, p in trained_params.items() if "lora_" not in n}
        for name, original in getattr(fresh, part).named_parameters():
            assert torch.equal(base[name], original), f"{part} base weight {name} changed"


def test_vae_encodes_each_image_exactly_once(trained: dict[str, Any]) -> None:
    encoded = torch.cat(trained["encoded"])
    assert encoded.shape[0] == len(REF_AGES) + len(REG_AGES)
    assert len({tuple(row.flatten()[:64].tolist()) for row in encoded}) == encoded.shape[0]


def test_saved_lora_loads_in_plain_diffusers_and_changes_output(trained: dict[str, Any], tiny_pipe: Any) -> None:
    folder = trained["project"].root / "runs" / "full"
    keys = load_file(str(folder / "pytorch_lora_weights.safetensors")).keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    pipe = copy.deepcopy(tiny_pipe)

    def render():
        return pipe(
            "photo of sks person as 40-year-old",
            num_inference_steps=2,
            height=128,
            width=128,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    before = render()
    pipe.load_lora_weights(str(folder))
    after = render()
    assert abs(after - before).max() > 1e-4
    trained_unet = dict(trained["pipe"].unet.named_parameters())
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            assert torch.allclose(param, trained_unet[name.replace("default_0", "default")])
    scales = {m.scaling["default_0"] for m in pipe.unet.modules() if hasattr(m, "scaling") and m.scaling}
    assert scales == {1.0}  # alpha = rank


def test_interrupted_run_resumes_bit_identically(
    trained: dict[str, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = trained["project"]
    config = tiny_config(tiny_model_dir)

    def interrupt_after_one(self, stats):
        if stats["step"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "on_step_end", interrupt_after_one)
    with pytest.raises(InterruptedRun, match="step 1/3.*--resume --run half") as info:
        run(project, config, "half")
    assert info.value.exit_code == EXIT_INTERRUPTED == 130
    entry = find(project.read()["runs"], "half", key="name")
    assert entry["finished"] is False and entry["steps_done"] == 1
    folder = project.root / "runs" / "half"
    assert json.loads((folder / "pytorch_lora_weights.json").read_text())["finished"] is False
    with pytest.raises(SelfageError, match="unfinished run; pass --resume"):
        run(project, config, "half")

    # A checkpoint written by several processes (accelerate launch) and resumed by one: said, not refused.
    state_file = folder / "checkpoints" / "step-000001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    console.WARNINGS.clear()

    monkeypatch.undo()
    resumed_steps = []
    monkeypatch.setattr(Trainer, "on_step_end", lambda self, stats: resumed_steps.append(stats["step"]))
    summary = run(project, tiny_config(tiny_model_dir, steps=50, lr=1.0), "half", resume=True)  # recorded config wins
    assert resumed_steps == [2, 3] and summary.exit_code == 0
    assert any("written by a run of 2 process(es) and continues with 1" in w for w in console.WARNINGS)
    assert find(project.read()["runs"], "half", key="name")["finished"] is True
    full = load_file(str(project.root / "runs" / "full" / "pytorch_lora_weights.safetensors"))
    half = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert full.keys() == half.keys()
    for key in full:
        assert torch.equal(full[key], half[key]), key
    log = [json.loads(line)["step"] for line in (folder / "loss.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]

    with pytest.raises(SelfageError, match="finished run; pass --force"):
        run(project, config, "half")
    again = run(project, config, "half", resume=True)
    assert again.skipped and "already finished" in again.lines[0]


def test_a_run_resumes_after_its_base_model_folder_moved(
    tmp_path: Path, tiny_model_dir: Path, astronaut_path: Path, hopper_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    project = make_train_project(tmp_path / "proj", [astronaut_path, hopper_path])
    first = shutil.copytree(tiny_model_dir, tmp_path / "models" / "sd")
    monkeypatch.setattr(Trainer, "on_step_end", lambda self, stats: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(InterruptedRun):
        run(project, tiny_config(first), "moving")
    monkeypatch.undo()
    moved = first.rename(tmp_path / "models" / "sd-moved")

    with pytest.raises(SelfageError, match=f"the base model it was trained on, {first}, is no longer there"):
        run(project, tiny_config(Path("someone/another-model")), "moving", resume=True)
    summary = run(project, tiny_config(moved), "moving", resume=True)  # the same weights, elsewhere
    assert summary.exit_code == 0
    entry = find(project.read()["runs"], "moving", key="name")
    assert entry["finished"] is True and entry["base_model"] == str(moved)


def test_latent_cache_draws_what_re_encoding_draws(trained: dict[str, Any], tiny_pipe: Any, tmp_path: Path) -> None:
    """Sampling the cached latent distribution gives the same step as re-encoding (same generator)."""
    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    losses = {}
    for cache in (True, False):
        config = tiny_config(Path(trained["trainer"].config.base_model), latent_cache=cache)
        trainer = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs, run_dir=None)
        losses[cache] = [trainer.step()["loss"] for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_frozen_text_encoder_uses_cached_embeddings(trained: dict[str, Any], tiny_pipe: Any, tmp_path: Path) -> None:
    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    config = tiny_config(Path(trained["trainer"].config.base_model), train_text_encoder=False)
    pipe = copy.deepcopy(tiny_pipe)
    trainer = Trainer(pipe, config, refs, regs, run_dir=None)
    assert trainer.prompt_cache is not None and trainer.prompt_cache.shape[0] == len(REF_AGES) + len(REG_AGES)
    calls = []
    pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    assert torch.isfinite(torch.tensor(trainer.step()["loss"]))
    assert calls == [] and not any("lora" in n for n, _ in pipe.text_encoder.named_parameters())
    keys = load_file(str(trainer.save_lora(tmp_path))).keys()
    assert keys and all(k.startswith("unet.") for k in keys)


def test_v_prediction_models_train_on_the_velocity(trained: dict[str, Any], tiny_pipe: Any) -> None:
    """SD 2.x-v style models: the regression target is the velocity, not the noise."""
    from diffusers import DDIMScheduler

    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    config = tiny_config(Path(trained["trainer"].config.base_model))
    pipe = copy.deepcopy(tiny_pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    trainer = Trainer(pipe, config, refs, regs, run_dir=None)
    assert trainer.prediction_type == "v_prediction"
    seen: dict[str, torch.Tensor] = {}
    real_loss = trainer.loss
    real_velocity = trainer.scheduler.get_velocity

    def spy_velocity(sample, noise, timesteps):
        seen["noise"] = noise
        seen["velocity"] = real_velocity(sample, noise, timesteps)
        return seen["velocity"]

    def spy_loss(pred, target):
        seen["target"] = target
        return real_loss(pred, target)

    trainer.scheduler.get_velocity = spy_velocity
    trainer.loss = spy_loss
    assert torch.isfinite(torch.tensor(trainer.step()["loss"]))
    assert torch.equal(seen["target"], seen["velocity"])
    assert not torch.allclose(seen["target"], seen["noise"])


# ---- the whole-step CUDA graph (train/engine/cuda_graph.py), on the CPU with stand-in recorders -------------------
class StandInGraphs:
    """Records nothing: a replay runs the recorded body again, on the very tensors it was given, with
    fresh gradients (a real replay rewrites the gradient buffers its recording created)."""

    params: list[torch.nn.Parameter] = []

    def __init__(self) -> None:
        self.recordings = 0

    def side_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def record(self, body):
        self.recordings += 1

        def replay():
            for param in self.params:
                param.grad = None
            return body()

        return replay


class WrongGraphs(StandInGraphs):
    """A recording whose replay corrupts the weights and reports a wrong loss."""

    def record(self, body):
        replay_body = super().record(body)

        def replay():
            totals, grad_norm = replay_body()
            with torch.no_grad():
                for param in self.params:
                    param.add_(1.0)
            return {**totals, "loss": totals["loss"] * 3}, grad_norm

        return replay


class StaleGraphs(StandInGraphs):
    """A recording whose replays read the inputs it was recorded on, not the ones copied in since."""

    def record(self, body):
        replay_body = super().record(body)
        recorded = [t.clone() for t in self.step.static.tensors()]

        def replay():
            for tensor, value in zip(self.step.static.tensors(), recorded, strict=True):
                tensor.copy_(value)
            return replay_body()

        return replay


class BrokenGraphs(StandInGraphs):
    def record(self, body):
        raise RuntimeError("operation not permitted when stream is capturing")


def _graph_run(trained: dict[str, Any], tiny_pipe: Any, backend: Any, steps: int = 5) -> tuple[list[float], Trainer]:
    from selfage_cli.train.engine.cuda_graph import GraphedStep

    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    config = tiny_config(Path(trained["trainer"].config.base_model))
    trainer = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs, run_dir=None)
    if backend is not None:
        backend.params = trainer.params
        trainer.graphed = backend.step = GraphedStep(trainer, backend=backend)
    return [trainer.step()["loss"] for _ in range(steps)], trainer


def _lora(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.params]


def test_graphed_training_steps_are_the_eager_steps(trained: dict[str, Any], tiny_pipe: Any) -> None:
    """Warm-up eagerly, record once, then every step copies its draws into the recorded inputs."""
    eager_losses, eager = _graph_run(trained, tiny_pipe, None)
    backend = StandInGraphs()
    losses, graphed = _graph_run(trained, tiny_pipe, backend)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    assert len(set(losses)) == len(losses)  # new draws every step: a replay reading stale inputs would repeat
    for a, b in zip(_lora(eager), _lora(graphed), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    step = graphed.graphed
    assert backend.recordings == 1 and step.eager_steps == 2 and step.replays == 3
    assert step.loss_difference == pytest.approx(0.0, abs=1e-6) and step.runner == "cuda-graph"
    assert graphed.last["grad_norm"] > 0
    graphed.release_graph()  # what fit() does at the end: the graph and its gradients go
    assert graphed.graphed is None and all(p.grad is None for p in graphed.params)
    assert torch.isfinite(torch.tensor(graphed.step()["loss"]))  # and later steps run eagerly


def test_graphed_fit_checkpoints_and_resumes_to_the_eager_run(
    trained: dict[str, Any], tiny_pipe: Any, tmp_path: Path
) -> None:
    """fit() with the graphed step: checkpoints taken between replays, a resume that warms up and records
    again, and the end of training (the graph released) give the weights and losses of an eager run."""
    from selfage_cli.train.engine.cuda_graph import GraphedStep

    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    config = tiny_config(Path(trained["trainer"].config.base_model), steps=6, checkpoint_every=2)

    def trainer(name: str, graphed: bool) -> Trainer:
        (tmp_path / name).mkdir(exist_ok=True)
        made = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs, run_dir=tmp_path / name)
        if graphed:
            backend = StandInGraphs()
            backend.params = made.params
            made.graphed = GraphedStep(made, backend=backend)
        return made

    def losses(name: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]

    eager = trainer("eager", graphed=False)
    eager.fit()
    graphed = trainer("graphed", graphed=True)
    step = graphed.graphed
    graphed.fit()
    assert step.replays == 4 and step.eager_steps == 2 and graphed.graphed is None  # released at the end
    assert graphed.step_runner == "cuda-graph" and eager.step_runner == "eager"
    assert losses("graphed") == pytest.approx(losses("eager"), rel=1e-6)
    for a, b in zip(_lora(eager), _lora(graphed), strict=True):
        assert torch.allclose(a, b, atol=1e-7)

    resumed = trainer("graphed", graphed=True)
    resumed.load_checkpoint(tmp_path / "graphed" / "checkpoints" / "step-000002")
    resumed.fit()
    assert resumed.step_done == 6
    for a, b in zip(_lora(eager), _lora(resumed), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (WrongGraphs(), "disagreed with eager execution (loss relative difference 2 > 0.02)"),
        (StaleGraphs(), "disagreed with eager execution (loss relative difference"),
        (BrokenGraphs(), "could not be recorded (operation not permitted when stream is capturing)"),
    ],
)
def test_a_wrong_or_failed_graph_is_undone_and_training_goes_on_eagerly(
    trained: dict[str, Any], tiny_pipe: Any, capsys: pytest.CaptureFixture[str], backend: Any, message: str
) -> None:
    eager_losses, eager = _graph_run(trained, tiny_pipe, None)
    losses, graphed = _graph_run(trained, tiny_pipe, backend)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for a, b in zip(_lora(eager), _lora(graphed), strict=True):
        assert torch.allclose(a, b, atol=1e-7)  # the corrupted replay was undone
    assert graphed.graphed.runner == "eager"
    err = capsys.readouterr().err
    assert f"CUDA-graph replay of the training step {message}" in err
    assert err.count("CUDA-graph replay of the training step") == 1


def test_cuda_graph_is_refused_with_a_reason_where_it_cannot_work(
    trained: dict[str, Any], tiny_pipe: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from selfage_cli.train.engine.cuda_graph import why_not_graphed

    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    config = tiny_config(Path(trained["trainer"].config.base_model), cuda_graph=True)
    trainer = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs, run_dir=None)
    assert trainer.graphed is None and not trainer.use_graph
    assert "--cuda-graph does not work off a CUDA GPU; training runs without it." in capsys.readouterr().err
    assert torch.isfinite(torch.tensor(trainer.step()["loss"]))
    base = tiny_config(Path(config.base_model))
    assert why_not_graphed(base, "cuda", torch.bfloat16, 1) is None
    assert why_not_graphed(base, "cuda", torch.float32, 1) is None
    for field, value, reason in [
        ("gradient_accumulation", 2, "--gradient-accumulation above 1"),
        ("gradient_checkpointing", True, "--gradient-checkpointing"),
        ("compile", True, "--compile"),
        ("use_8bit_adam", True, "--use-8bit-adam"),
    ]:
        assert reason in why_not_graphed(
            tiny_config(Path(config.base_model), **{field: value}), "cuda", torch.float32, 1
        )
    assert "fp16" in why_not_graphed(base, "cuda", torch.float16, 1)
    assert why_not_graphed(base, "cuda", torch.bfloat16, 2) == "several processes"
    assert why_not_graphed(base, "mps", torch.float32, 1) == "off a CUDA GPU"


@pytest.mark.parametrize(
    ("asked", "device", "wanted", "warned"),
    [
        (None, "cuda", True, False),  # the default: on where it works
        (None, "cpu", False, False),  # ... and silently off where it does not
        (True, "cuda", True, False),
        (True, "cpu", False, True),  # asked for: says why not
        (False, "cuda", False, False),  # --no-cuda-graph
    ],
)
def test_cuda_graph_is_used_wherever_it_works_unless_turned_off(
    capsys: pytest.CaptureFixture[str], asked: bool | None, device: str, wanted: bool, warned: bool
) -> None:
    from selfage_cli.train.engine.cuda_graph import graph_wanted

    config = TrainConfig(cuda_graph=asked)
    assert graph_wanted(config, device, torch.bfloat16, 1) is wanted
    assert ("--cuda-graph does not work off a CUDA GPU" in capsys.readouterr().err) is warned


def test_default_training_on_a_cpu_runs_eagerly_without_a_word(
    trained: dict[str, Any], tiny_pipe: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    config = tiny_config(Path(trained["trainer"].config.base_model))
    assert config.cuda_graph is None
    trainer = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs, run_dir=None)
    assert trainer.graphed is None and not trainer.use_graph
    assert "cuda-graph" not in capsys.readouterr().err


def test_resuming_sets_the_optimiser_capturable_as_this_run_needs(
    trained: dict[str, Any], tiny_pipe: Any, tmp_path
) -> None:
    """A checkpoint of a run that replayed CUDA graphs (capturable AdamW) resumed eagerly, and the other
    way round: the optimiser follows this run, not the checkpoint (else recording would fail)."""
    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    config = tiny_config(Path(trained["trainer"].config.base_model))
    trainer = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs, run_dir=tmp_path / "run")
    trainer.step()
    folder = trainer.save_checkpoint()
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    for group in state["param_groups"]:
        group["capturable"] = True
    torch.save(state, folder / "optimizer.pt")
    resumed = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs, run_dir=tmp_path / "run")
    resumed.load_checkpoint(folder)
    assert all(group["capturable"] is False for group in resumed.optimizer.param_groups)
    assert torch.isfinite(torch.tensor(resumed.step()["loss"]))


def test_the_recorded_step_body_makes_no_host_sync(trained: dict[str, Any], tiny_pipe: Any) -> None:
    """What a CUDA-graph recording forbids, caught on the CPU: reading a value back to Python
    (``.item()``, ``bool(tensor)``) and building a tensor from Python data (a host-to-device copy)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    forbidden = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default}

    class Spy(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in forbidden:
                self.seen.append(f"{func} at {traceback.extract_stack()[-2]}")
            return func(*args, **(kwargs or {}))

    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    trainer = Trainer(copy.deepcopy(tiny_pipe), tiny_config(Path(trained["trainer"].config.base_model)), refs, regs)
    # As on a GPU: AdamW keeps its step count on the device (fused here, fused + capturable there),
    # and its state exists before the recording (made by the eager warm-up steps).
    trainer.optimizer = torch.optim.AdamW(trainer.params, lr=1e-3, weight_decay=1e-2, fused=True)
    trainer.optimise(trainer.step_inputs(0))
    inputs = trainer.step_inputs(1)
    with Spy() as spy:
        totals, grad_norm = trainer.optimise(inputs)
    assert spy.seen == []
    assert torch.isfinite(totals["loss"]) and torch.isfinite(grad_norm)


def test_uncast_lora_inputs_give_the_same_step_with_fewer_copies(trained: dict[str, Any], tiny_pipe: Any) -> None:
    """Under bf16 autocast, PEFT's cast of each LoRA input to fp32 (which autocast undoes) is skipped:
    bit-identical losses and weights, and fewer copy kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                CountCopies.copies += 1
            return func(*args, **(kwargs or {}))

    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    results = {}
    for uncast in (True, False):
        config = tiny_config(Path(trained["trainer"].config.base_model), dtype="bf16")
        trainer = Trainer(copy.deepcopy(tiny_pipe), config, refs, regs)
        assert trainer.weight_dtype == torch.bfloat16 and len(trainer.uncast_lora) > 0
        if not uncast:
            trainer.uncast_lora = []
        CountCopies.copies = 0
        with CountCopies():
            losses = [trainer.step()["loss"] for _ in range(2)]
        results[uncast] = (losses, _lora(trainer), CountCopies.copies)
        if uncast:
            layers = trainer.uncast_lora
    assert results[True][0] == results[False][0]
    for a, b in zip(results[True][1], results[False][1], strict=True):
        assert torch.equal(a, b)
    assert results[True][2] < results[False][2]
    assert all(layer.cast_input_dtype_enabled for layer in layers)  # restored after each forward


def test_steps_put_the_models_in_training_mode_without_walking_them_every_step(
    trained: dict[str, Any], tiny_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs, regs = trained["trainer"].refs, trained["trainer"].regs
    trainer = Trainer(copy.deepcopy(tiny_pipe), tiny_config(Path(trained["trainer"].config.base_model)), refs, regs)
    trainer.unet_fwd.eval()
    walks = []
    real_train = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: walks.append(self) or real_train(self, mode))
    trainer.step()
    assert trainer.unet.training and all(m.training for m in trainer.unet.modules())
    assert trainer.text_encoder.training
    first = len(walks)
    trainer.step()
    assert first > 0 and len(walks) == first  # the second step walks nothing
