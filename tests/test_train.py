"""Training, fast parts: the contrastive loss, the loss layout, batch order, prompts, config, image checks."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from selfage_cli.errors import SelfageError
from selfage_cli.project import Project
from selfage_cli.train.config import TrainConfig
from selfage_cli.train.engine.contrastive import nt_xent_per_channel
from selfage_cli.train.engine.data import BatchPlan, load_pixels
from selfage_cli.train.engine.loop import Trainer
from selfage_cli.train.images import select_references, select_regularisation

CHECK_PRED = [[[[1, 0]], [[0, 1]]], [[[0, 1]], [[1, 1]]]]
CHECK_TARGET = [[[[1, 1]], [[0, 1]]], [[[1, 0]], [[1, -1]]]]


def nt_xent_by_loops(pred: np.ndarray, target: np.ndarray, temperature: float = 0.5) -> float:
    """The issue's definition written out with explicit loops (independent of the implementation)."""
    batch, channels = pred.shape[:2]
    total = 0.0
    for c in range(channels):
        z = [pred[i, c].ravel() for i in range(batch)] + [target[i, c].ravel() for i in range(batch)]
        z = [v / np.linalg.norm(v) for v in z]
        channel_loss = 0.0
        for a in range(2 * batch):
            positive = (a + batch) % (2 * batch)
            denom = sum(math.exp(float(z[a] @ z[k]) / temperature) for k in range(2 * batch) if k != a)
            channel_loss += -math.log(math.exp(float(z[a] @ z[positive]) / temperature) / denom)
        total += channel_loss / (2 * batch)
    return total / channels


def test_contrastive_check_value() -> None:
    pred = torch.tensor(CHECK_PRED, dtype=torch.float32)
    target = torch.tensor(CHECK_TARGET, dtype=torch.float32)
    value = float(nt_xent_per_channel(pred, target, 0.5))
    assert value == pytest.approx(1.26149, abs=1e-5)
    assert nt_xent_by_loops(np.array(CHECK_PRED, float), np.array(CHECK_TARGET, float)) == pytest.approx(
        1.26149, abs=1e-5
    )
    assert abs(value - 1.08109) > 0.1  # not the one-way pred→target reading


def test_contrastive_batch_of_four_matches_hand_loops() -> None:
    rng = np.random.default_rng(7)
    pred = rng.normal(size=(4, 3, 2, 3))
    target = pred + 0.5 * rng.normal(size=pred.shape)
    expected = nt_xent_by_loops(pred, target)
    got = float(nt_xent_per_channel(torch.tensor(pred), torch.tensor(target)))
    assert got == pytest.approx(expected, rel=1e-5)
    # a batch of one has no negatives
    assert float(nt_xent_per_channel(torch.tensor(pred[:1]), torch.tensor(target[:1]))) == pytest.approx(0.0)


def test_loss_layout_instance_half_then_prior_half() -> None:
    """Trainer.loss reads [B instance | B prior]: MSE_inst + wc*C_inst + wp*(MSE_prior + wc*C_prior)."""
    cfg = SimpleNamespace(contrast_weight=0.1, prior_weight=2.0, temperature=0.5)
    fake = SimpleNamespace(config=cfg)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 4, 2, 2, generator=g)
    pred = target.clone()
    pred[2:] += 1.0  # only the prior half (second half) is off by one
    total, tensors = Trainer.loss(fake, pred, target)
    parts = {k: float(v) for k, v in tensors.items()}
    assert parts["mse_inst"] == pytest.approx(0.0)
    assert parts["mse_prior"] == pytest.approx(1.0)
    c_inst = float(nt_xent_per_channel(pred[:2], target[:2]))
    c_prior = float(nt_xent_per_channel(pred[2:], target[2:]))
    assert parts["c_inst"] == pytest.approx(c_inst) and parts["c_prior"] == pytest.approx(c_prior)
    assert float(total) == pytest.approx(0.0 + 0.1 * c_inst + 2.0 * (1.0 + 0.1 * c_prior), rel=1e-6)


def test_batch_plan_cycles_references_and_shuffles_both() -> None:
    plan = BatchPlan(num_refs=3, num_reg=5, batch_size=2, seed=42)
    assert plan.epoch_len == 5
    refs, regs = [], []
    for micro in range(5):  # 10 items = two epochs of 5
        r, g = plan.items(micro)
        assert len(r) == len(g) == 2
        refs += r
        regs += g
    for epoch in (refs[:5], refs[5:]):
        assert sorted(epoch) in ([0, 0, 1, 1, 2], [0, 1, 1, 2, 2], [0, 0, 1, 2, 2])  # cyclic: each 1–2 times
        assert set(epoch) == {0, 1, 2}
    assert sorted(regs[:5]) == sorted(regs[5:]) == [0, 1, 2, 3, 4]  # every reg image once per epoch
    assert regs[:5] != regs[5:] or refs[:5] != refs[5:]  # reshuffled per epoch
    again = BatchPlan(3, 5, 2, 42)
    assert [again.items(m) for m in (4, 0, 3)] == [plan.items(m) for m in (4, 0, 3)]  # pure function of (seed, m)
    assert [BatchPlan(3, 5, 2, 7).items(m) for m in range(5)] != [plan.items(m) for m in range(5)]


def _write(path: Path, size: int = 64, shade: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 50, 200)).save(path)
    return path


def test_references_first_n_by_file_name_with_integer_age_prompts(tmp_path: Path) -> None:
    project = Project(tmp_path)
    manifest = {"references": [], "regularisation": {"images": []}}
    for name, age in (("c_photo", 50.0), ("a_photo", 30), ("d_photo", None), ("b_photo", 40)):
        aligned = _write(tmp_path / "refs" / "aligned" / f"{name}.png")
        manifest["references"].append(
            {"id": name, "source": f"/photos/{name}.jpg", "aligned": project.relative(aligned), "age": age}
        )
    chosen = select_references(project, manifest, 2, "photo of sks person")
    assert [img.id for img in chosen] == ["a_photo", "b_photo"]
    assert [img.prompt for img in chosen] == [
        "photo of sks person as 30-year-old",
        "photo of sks person as 40-year-old",
    ]
    all_three = select_references(project, manifest, 5, "photo of sks person")  # warns: fewer than asked
    assert [img.prompt for img in all_three][-1] == "photo of sks person as 50-year-old"  # 50.0 → 50
    cfg = TrainConfig(class_prompt="photo of person")
    assert cfg.prompt(7, instance=False) == "photo of person as 7-year-old"

    reg = _write(tmp_path / "reg" / "x.png")
    manifest["regularisation"]["images"] = [
        {"id": "x", "source": str(reg), "age": 61},
        {"id": "y", "source": str(reg), "age": None},
    ]
    regs = select_regularisation(project, manifest, "photo of person")
    assert [(r.id, r.prompt) for r in regs] == [("x", "photo of person as 61-year-old")]


def test_bad_reference_and_regularisation_sets(tmp_path: Path) -> None:
    project = Project(tmp_path)
    with pytest.raises(SelfageError, match="no aligned references.*--refs"):
        select_references(project, {"references": []}, 3, "p")
    aligned = _write(tmp_path / "refs" / "a.png")
    unlabelled = {"references": [{"id": "a", "aligned": project.relative(aligned), "age": None}]}
    with pytest.raises(SelfageError, match="has an age.*label-ages"):
        select_references(project, unlabelled, 3, "p")
    with pytest.raises(SelfageError, match="no regularisation set.*label-ages --reg.*make-reg"):
        select_regularisation(project, {"regularisation": {"images": []}}, "p")
    with pytest.raises(SelfageError, match="have no ages.*make-reg"):
        select_regularisation(
            project, {"regularisation": {"images": [{"id": "a", "source": str(aligned), "age": None}]}}, "p"
        )


def test_images_of_another_size_are_resized_and_noted(tmp_path: Path) -> None:
    notes: dict[str, list[str]] = {}
    square = load_pixels(_write(tmp_path / "big.png", size=96), 64, notes)
    assert square.shape == (3, 64, 64) and float(square.min()) >= -1.0 and float(square.max()) <= 1.0
    assert notes["resized"] and "cropped" not in notes
    Image.new("RGB", (80, 64)).save(tmp_path / "wide.png")
    load_pixels(tmp_path / "wide.png", 64, notes)
    assert notes["cropped"] == ["wide.png"]
    exact: dict[str, list[str]] = {}
    load_pixels(_write(tmp_path / "ok.png", size=64), 64, exact)
    assert exact == {}


def test_config_round_trip_and_checks() -> None:
    cfg = TrainConfig(steps=5, rank=4, validate_ages="10,40")
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg and again.alpha == 4 and again.validation_ages() == [10, 40]
    assert TrainConfig.from_json('{"steps": 3, "unknown": 1}').steps == 3
    resumed = TrainConfig(steps=99, device="cpu").with_method_of(cfg.to_json())
    assert resumed.steps == 5 and resumed.device == "cpu"
    for bad in (dict(steps=0), dict(lr=0), dict(resolution=0), dict(rank=0), dict(validate_ages="10,x")):
        with pytest.raises(SelfageError):
            TrainConfig(**bad)
    TrainConfig(resolution=100)  # the multiple depends on the model: checked once it is loaded


def test_resolution_multiple_comes_from_the_loaded_model(tiny_pipe: object) -> None:
    from selfage_cli.models import check_resolution, resolution_multiple

    # tiny model: vae_scale_factor 8 (4 VAE blocks), 4 UNet down blocks -> 8 * 2**3 = 64
    assert tiny_pipe.vae_scale_factor == 8 and len(tiny_pipe.unet.config.down_block_types) == 4
    assert resolution_multiple(tiny_pipe) == 64
    for ok in (64, 128, 192):
        check_resolution(tiny_pipe, ok)
    for bad in (100, 32, 0):
        with pytest.raises(SelfageError, match=r"--resolution .* multiple of 64"):
            check_resolution(tiny_pipe, bad)
    shallow = SimpleNamespace(
        vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(down_block_types=["A", "B"], sample_size=16))
    )
    assert resolution_multiple(shallow) == 16
    check_resolution(shallow, 80)


def test_a_stop_request_waits_for_the_step_unless_ctrl_c_comes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from selfage_cli.train.engine import loop

    clock = iter([100.0, 100.2, 101.5])
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    stop = loop.StopRequest()
    assert not stop.requested
    stop._on_signal(signal.SIGTERM, None)  # the first signal only asks
    assert stop.requested
    stop._on_signal(signal.SIGINT, None)  # 0.2 s later: a launcher's echo of the same Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGINT, None)  # 1.5 s later: the user means it
