"""DEX: loading the SAM checkpoint safely, the 101-way expectation, the preprocessing chain."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfage_cli.ages.engine import dex
from selfage_cli.errors import SelfageError


@pytest.fixture(scope="module")
def faces(astronaut_path: Path, hopper_path: Path) -> list[Image.Image]:
    return [Image.open(astronaut_path).convert("RGB"), Image.open(hopper_path).convert("RGB").resize((512, 512))]


@pytest.fixture(scope="module")
def random_dex(dex_weights_path: Path) -> dex.DexAgeClassifier:
    return dex.load_dex(dex_weights_path, "cpu")


def _reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """VGG-16 written out with torch.nn.functional from the checkpoint's own key names (the SAM network)."""
    groups = [
        ["conv1_1", "conv1_2"],
        ["conv2_1", "conv2_2"],
        ["conv3_1", "conv3_2", "conv3_3"],
        ["conv4_1", "conv4_2", "conv4_3"],
        ["conv5_1", "conv5_2", "conv5_3"],
    ]
    for group in groups:
        for name in group:
            x = F.relu(F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], padding=1))
        x = F.max_pool2d(x, 2, 2)
    x = x.view(x.size(0), -1)
    x = F.relu(F.linear(x, state["fc6.weight"], state["fc6.bias"]))
    x = F.relu(F.linear(x, state["fc7.weight"], state["fc7.bias"]))
    return F.linear(x, state["fc8-101.weight"], state["fc8-101.bias"])


def test_sam_format_checkpoint_loads_and_gives_ages_in_range(random_dex, dex_state_dict, faces):
    assert "fc8-101.weight" in dex_state_dict  # the SAM key spelling, mapped to fc8_101 by the loader
    ages = dex.estimate_ages(random_dex, faces, progress=False)
    assert len(ages) == 2
    assert all(0.0 <= age <= 100.0 for age in ages)
    # Our module computes what the SAM network computes (independent functional forward, same weights).
    batch = dex.preprocess_images(faces[:1])
    with torch.inference_mode():
        expected_logits = _reference_forward(dex_state_dict, batch)
        ours = random_dex(batch)
    torch.testing.assert_close(ours, expected_logits, rtol=1e-4, atol=1e-4)
    probs = torch.softmax(expected_logits, -1)[0]
    assert ages[0] == pytest.approx(float(sum(j * probs[j] for j in range(101))), abs=1e-3)


def test_zero_head_gives_the_expectation_of_the_bias(tmp_path, dex_state_dict, faces):
    bias = torch.linspace(-3.0, 4.0, 101) + torch.sin(torch.arange(101.0))
    state = dict(dex_state_dict)
    state["fc8-101.weight"] = torch.zeros(101, 4096)
    state["fc8-101.bias"] = bias
    path = tmp_path / "dex_zero_head.pth"
    torch.save({"state_dict": state}, path)
    del state
    model = dex.load_dex(path, "cpu")
    softmax = np.exp(bias.double().numpy() - bias.double().numpy().max())
    softmax /= softmax.sum()
    expected = float(sum(j * softmax[j] for j in range(101)))
    ages = dex.estimate_ages(model, [faces[0], Image.new("RGB", (128, 128), (200, 10, 30))], batch_size=1)
    assert ages == pytest.approx([expected] * 2, abs=1e-3)


def test_expected_age_formula():
    logits = torch.full((2, 101), -1e4)
    logits[0, 37] = 0.0
    logits[1, 10] = logits[1, 20] = 0.0
    assert dex.expected_age(logits).tolist() == pytest.approx([37.0, 15.0])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1_1.weight": Exploit()}}, path)  # torch's own format, a GLOBAL inside
    legacy = tmp_path / "evil_plain.pkl"
    legacy.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    with pytest.raises(SelfageError, match="refused: loading it would run code; nothing in it ran"):
        dex.load_dex(path, "cpu")
    with pytest.raises(SelfageError) as info:
        dex.load_dex(legacy, "cpu")
    assert str(legacy) in str(info.value) and "nothing in it was run" in str(info.value)
    assert not marker.exists()


def test_garbled_truncated_and_wrong_shape_checkpoints_are_refused(tmp_path):
    garbled = tmp_path / "garbled.pth"
    garbled.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(SelfageError, match="not a readable PyTorch checkpoint"):
        dex.load_dex(garbled, "cpu")

    small = {f"{name}.weight": torch.zeros(2, 2) for name in ("conv1_1", "fc6")}
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": small}, wrong)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(wrong.read_bytes()[: wrong.stat().st_size // 2])
    with pytest.raises(SelfageError, match="not a readable PyTorch checkpoint"):
        dex.load_dex(truncated, "cpu")
    with pytest.raises(SelfageError) as info:
        dex.load_dex(wrong, "cpu")
    message = str(info.value)
    assert "not the DEX VGG-16" in message and "missing conv1_1.bias, conv1_2.weight" in message
    assert "conv1_1.weight has shape (2, 2), expected (64, 3, 3, 3)" in message

    empty = tmp_path / "empty.pth"
    torch.save({"state_dict": {}}, empty)
    with pytest.raises(SelfageError, match="holds no state dict"):
        dex.load_dex(empty, "cpu")


def test_missing_weights_error_says_what_where_and_how(monkeypatch, tmp_path):
    monkeypatch.delenv(dex.DEX_ENV, raising=False)
    with pytest.raises(SelfageError) as info:
        dex.resolve_dex_weights(None, None)
    message = str(info.value)
    assert "dex_age_classifier.pth" in message and "yuval-alaluf/SAM" in message
    assert "--dex-weights" in message and "SELFAGE_DEX_WEIGHTS" in message
    with pytest.raises(SelfageError, match="not a file"):
        dex.resolve_dex_weights(tmp_path / "nope.pth", None)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv(dex.DEX_ENV, str(weights))
    assert dex.resolve_dex_weights(None, None) == weights.resolve()
    other = tmp_path / "other.pth"
    other.write_bytes(b"x")
    assert dex.resolve_dex_weights(other, None) == other.resolve()  # the option wins over the environment


def test_resize_chain_matches_its_description():
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 3, 512, 512, generator=generator) * 2 - 1
    manual = F.interpolate(batch, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)
    manual = F.interpolate(manual, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(dex.resize_for_dex(batch, "antialias"), manual, rtol=0, atol=0)
    direct = F.interpolate(batch, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(dex.resize_for_dex(batch, "reference"), direct, rtol=0, atol=0)

    # PIL image → RGB in [-1, 1] → the same chain.
    pixels = np.random.default_rng(0).integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1
    expected = F.interpolate(
        F.interpolate(tensor, size=(256, 256), mode="bilinear", antialias=True), size=(224, 224), mode="bilinear"
    )
    got = dex.preprocess_images([Image.fromarray(pixels)])
    assert got.shape == (1, 3, 224, 224) and got.min() >= -1 and got.max() <= 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    # What the antialiasing is for: a one-pixel checkerboard averages to grey, the direct resize aliases.
    checker = (torch.arange(512)[:, None] + torch.arange(512)[None, :]) % 2 * 2.0 - 1.0
    checker = checker.expand(1, 3, 512, 512)
    assert dex.resize_for_dex(checker, "antialias").abs().max() < 0.05
    assert dex.resize_for_dex(checker, "reference").abs().max() > 0.5
    with pytest.raises(SelfageError, match="antialias or reference"):
        dex.resize_for_dex(batch, "bicubic")


def test_one_preprocess_check_for_every_entry_point(random_dex, faces):
    """resize_for_dex, estimate_ages (and label-ages, via the same function) refuse an unknown mode alike."""
    assert dex.check_preprocess("reference") == "reference"
    batch = torch.zeros(1, 3, 8, 8)
    for call in (
        lambda: dex.check_preprocess("bicubic"),
        lambda: dex.resize_for_dex(batch, "bicubic"),
        lambda: dex.estimate_ages(random_dex, faces[:1], preprocess="bicubic", progress=False),
    ):
        with pytest.raises(SelfageError, match=r"--dex-preprocess 'bicubic' is not known; use antialias or reference"):
            call()
