"""Loading Stable Diffusion 1.x/2.x pipelines, choosing device and dtype, and building random ones.

``load_pipeline`` takes a Hub id or a local diffusers folder, interchangeably, through
``from_pretrained``. ``build_random_pipeline`` makes a randomly initialised pipeline in two
architectures — ``tiny`` (SD 1.5's layout at tiny widths, 128 px) for tests and the demo, and
``sd15`` (the exact SD 1.5 architecture) for benchmarks — with the real CLIP BPE vocabulary shipped
in the package, so the tiny model tokenises exactly like SD 1.5.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from selfage_cli.errors import ModelNotFoundError, SelfageError
from selfage_cli.torch_files import refused_in

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ARCHITECTURES = ("tiny", "sd15", "tiny-sd2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- device and dtype --------------------------------------------------------------------------
def resolve_device(device: str | None = None) -> torch.device:
    """``--device`` value (``auto``/None, ``cpu``, ``cuda``, ``cuda:1``, ``mps``) → torch.device."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise SelfageError(f"--device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SelfageError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu.")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise SelfageError(f"--device {device} was asked for but MPS is not available; use --device cpu.")
    return chosen


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``--dtype`` value (``auto``/None, ``fp32``, ``fp16``, ``bf16``) → torch dtype for frozen weights.

    auto: bf16 on CUDA GPUs that support it, else fp16 on CUDA and MPS; fp32 on the CPU.
    """
    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise SelfageError(f"--dtype {dtype!r} is not known; use auto, fp32, fp16 or bf16.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ---- base-model names --------------------------------------------------------------------------
def model_reference(name: str | os.PathLike[str]) -> str:
    """How a base model is recorded: an existing local folder as its absolute path (so a run resumed,
    or a LoRA used, from another folder finds it), anything else (a Hub id) unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


# ---- loading -------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def load_pipeline(
    base_model: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline:
    """Load an SD 1.x/2.x pipeline from a Hub id or a local diffusers folder.

    Safety checker and feature extractor are not loaded (we never generate unconditioned images
    for display). Raises :class:`ModelNotFoundError` with the fix when the model cannot be had.
    """
    from diffusers import StableDiffusionPipeline

    name = str(base_model)  # chosen by base_model.choose_base_model (the one place with a default)
    device = resolve_device(device if isinstance(device, str) or device is None else str(device))
    dtype = dtype or resolve_dtype(None, device)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"--base-model {local} is a folder without model_index.json; pass a diffusers pipeline folder "
                "(e.g. one written by `selfage random-model` or `save_pretrained`)."
            )
        source: str = str(local.resolve())
    else:
        if looks_like_path(name):
            raise ModelNotFoundError(f"--base-model {name}: no such folder; check the path.")
        source = name
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        if refused := refused_in(exc):  # a pickled weights file that would run code (never loaded otherwise)
            raise ModelNotFoundError(f"--base-model {name}: {refused}; use a model saved as safetensors.") from exc
        raise ModelNotFoundError(_explain_load_failure(name, exc)) from exc
    _check_text_to_image(pipe, name)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def looks_like_path(name: str) -> bool:
    """Whether a --base-model value that is not an existing folder was meant as one (``./sd15``,
    ``/models/sd``, ``~/sd``, ``a/b/c``) rather than a Hub id (``owner/name``)."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)


def _check_text_to_image(pipe: Any, name: str) -> None:
    """Exit 2 for pipelines that load as Stable Diffusion but are not SD 1.x/2.x text-to-image models
    (inpainting and depth models, SD-XL-style extra conditioning, x₀-predicting schedulers)."""
    unet = pipe.unet.config
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    problem = None
    if int(unet.in_channels) != 4:
        problem = f"its UNet takes {unet.in_channels} input channels (an inpainting or depth model), not 4"
    elif unet.get("addition_embed_type"):
        problem = f"its UNet needs extra conditioning ({unet.addition_embed_type}, as SD-XL does)"
    elif prediction not in ("epsilon", "v_prediction"):
        problem = f"its scheduler predicts {prediction!r}, not the noise or the velocity"
    if problem:
        raise ModelNotFoundError(
            f"--base-model {name}: {problem}; pass an SD 1.x/2.x text-to-image model such as {DEFAULT_BASE_MODEL}."
        )


_UNSHOWN_TRACE = re.compile(r"\s*(Please )?check (out )?the root cause in the stack ?trace above\.?", re.IGNORECASE)


def _explain_load_failure(name: str, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _UNSHOWN_TRACE.search(text):  # no traceback is shown (unless --debug): say the root cause here
        cause = exc.__cause__ or exc.__context__
        text = _UNSHOWN_TRACE.sub("", text).strip()
        if cause is not None and str(cause):  # the Hub's own error, without diffusers' wrapping
            text = f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
    if Path(name).exists():
        return f"--base-model {name} could not be loaded as a diffusers pipeline ({text}); check the folder."
    offline = " (HF_HUB_OFFLINE is set)" if _hub_offline() else ""
    return (
        f"--base-model {name} was not found in the local Hugging Face cache and the Hub could not provide it"
        f"{offline} ({text}); download it on a machine with network (`hf download {name} "
        f"--local-dir ./sd15`) and pass the folder with --base-model ./sd15."
    )


def model_fingerprint(base_model: str | os.PathLike[str]) -> str:
    """A short content fingerprint of a base model's UNet weights.

    The same weight files give the same value whether the model is named by Hub id (read from the
    local Hugging Face cache) or by a local folder; a fine-tune with the same architecture gives
    another. Only the file sizes and 1 MiB from each end of each UNet weight file are read. A Hub
    model that is not cached yet falls back to its id. Used to check that a LoRA and an inversion
    cache belong to the model they are used with.
    """
    digest = hashlib.sha256()
    files = _unet_weight_files(base_model)
    if not files:
        digest.update(f"name:{base_model}".encode())
    for weight in files:
        size = weight.stat().st_size
        digest.update(f"{size}:".encode())
        with open(weight, "rb") as handle:
            digest.update(handle.read(_SAMPLE))
            handle.seek(max(0, size - _SAMPLE))
            digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()[:16]


_SAMPLE = 1 << 20
_UNET_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _unet_weight_files(base_model: str | os.PathLike[str]) -> list[Path]:
    """The UNet weight files of a local pipeline folder, or of a Hub model in the local cache."""
    local = Path(str(base_model)).expanduser()
    if local.is_dir():
        unet = local / "unet"
        return sorted(p for p in unet.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin"))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return []
    for name in _UNET_WEIGHT_NAMES:
        cached = try_to_load_from_cache(str(base_model), f"unet/{name}")
        if isinstance(cached, str):
            return [Path(cached)]
    return []


def pipeline_fingerprint(pipe: Any) -> str:
    """Fingerprint of a loaded pipeline's UNet *architecture* (its config): not proof of the same weights."""
    data = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def native_resolution(pipe: Any) -> int:
    """The pixel resolution the UNet was trained at (SD 1.5: 512, SD 2.x-v: 768, tiny: 128)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def configured_resolution(base_model: str | os.PathLike[str]) -> int | None:
    """:func:`native_resolution` read from a model's config files without loading it (a local folder, or
    a Hub model in the local cache); ``None`` when they cannot be read."""
    try:
        unet, vae = (_config_file(base_model, part) for part in ("unet", "vae"))
        if unet is None or vae is None:
            return None
        widths = json.loads(vae.read_text()).get("block_out_channels") or [0]
        return int(json.loads(unet.read_text())["sample_size"]) * 2 ** (len(widths) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _config_file(base_model: str | os.PathLike[str], part: str) -> Path | None:
    local = Path(str(base_model)).expanduser()
    if local.is_dir():
        path = local / part / "config.json"
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(base_model), f"{part}/config.json")
    except Exception:  # noqa: BLE001 - not a Hub id either: unknown
        return None
    return Path(cached) if isinstance(cached, str) else None


def resolution_multiple(pipe: Any) -> int:
    """The pixel multiple an image side must be for this model: the VAE's downscale factor times the
    UNet's total downsampling (``vae_scale_factor * 2 ** (number of down blocks - 1)``; SD 1.5: 64)."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def check_resolution(pipe: Any, resolution: int, option: str = "--resolution") -> None:
    """Raise SelfageError unless ``resolution`` is a positive multiple of :func:`resolution_multiple`."""
    multiple = resolution_multiple(pipe)
    if resolution < multiple or resolution % multiple:
        raise SelfageError(
            f"{option} {resolution} must be a multiple of {multiple} for this base model "
            f"(its VAE and UNet downsample by {multiple}); e.g. {option} {native_resolution(pipe)}."
        )


# ---- random model factory --------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """The configs of a pipeline's three networks (diffusers/transformers config kwargs), what its
    scheduler predicts and the tokenizer's padding token."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    prediction_type: str = "epsilon"
    pad_token: str = "<|endoftext|>"  # SD 1.x; SD 2.x pads with "!"


SCHEDULER_CONFIG: dict[str, Any] = {
    # SD 1.5's scheduler config (DDIM flavour): scaled-linear betas 0.00085 → 0.012.
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "trained_betas": None,
}


def _unet_config(
    widths: tuple[int, ...],
    layers: int,
    heads: int | tuple[int, ...],
    cross_dim: int,
    sample_size: int,
    groups: int,
    sd2: bool = False,
) -> dict[str, Any]:
    """SD 1.x's UNet layout; ``sd2``: SD 2.x's traits (linear projections, upcast attention; ``heads``
    then counts heads per level, as SD 2.x's ``attention_head_dim`` list does)."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads,
        "use_linear_projection": sd2,
        "upcast_attention": sd2,
    }


def _vae_config(widths: tuple[int, ...], layers: int, sample_size: int, groups: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def _text_config(
    hidden: int, layers: int, heads: int, intermediate: int, projection: int, act: str = "quick_gelu"
) -> dict[str, Any]:
    """CLIP's text encoder (SD 1.x: quick GELU; SD 2.x's OpenCLIP encoder: GELU)."""
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def architecture(arch: str) -> Architecture:
    """The network configs of ``tiny``, ``sd15`` or ``tiny-sd2``."""
    if arch == "sd15":
        return Architecture(
            unet=_unet_config((320, 640, 1280, 1280), layers=2, heads=8, cross_dim=768, sample_size=64, groups=32),
            vae=_vae_config((128, 256, 512, 512), layers=2, sample_size=512, groups=32),
            text_encoder=_text_config(hidden=768, layers=12, heads=12, intermediate=3072, projection=768),
        )
    if arch == "tiny":
        # SD 1.5's layout (four levels, cross-attention in the first three, mid block), tiny widths,
        # 16² latent = 128 px images.
        return Architecture(
            unet=_unet_config((32, 64, 64, 64), layers=1, heads=4, cross_dim=32, sample_size=16, groups=8),
            vae=_vae_config((16, 32, 32, 32), layers=1, sample_size=128, groups=8),
            text_encoder=_text_config(hidden=32, layers=2, heads=4, intermediate=64, projection=32),
        )
    if arch == "tiny-sd2":
        # SD 2.x's traits at tiny size: heads per level, linear projections and upcast attention in the
        # UNet, a GELU text encoder wider than the UNet's first level, "!" padding, v-prediction; and a
        # 24² latent (192 px), so that no layer choice can lean on the tiny model's 16².
        return Architecture(
            unet=_unet_config(
                (32, 64, 64, 64), layers=1, heads=(2, 4, 4, 4), cross_dim=48, sample_size=24, groups=8, sd2=True
            ),
            vae=_vae_config((16, 32, 32, 32), layers=1, sample_size=192, groups=8),
            text_encoder=_text_config(hidden=48, layers=2, heads=4, intermediate=96, projection=48, act="gelu"),
            prediction_type="v_prediction",
            pad_token="!",
        )
    raise SelfageError(f"--arch {arch!r} is not known; use one of: {', '.join(ARCHITECTURES)}.")


def tokenizer_folder() -> Path:
    """The packaged CLIP tokenizer files (vocab.json, merges.txt built from CLIP's BPE list)."""
    return Path(str(resources.files("selfage_cli") / "data" / "clip_tokenizer"))


def load_clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """SD 1.5's tokenizer (CLIP ViT-L/14 BPE, 77 tokens, padded with the end token); SD 2.x's is the
    same vocabulary padded with ``"!"``."""
    from transformers import CLIPTokenizer

    folder = tokenizer_folder()
    # Positional: transformers 4 names them vocab_file/merges_file, transformers 5 vocab/merges.
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        pad_token=pad_token,
    )


def build_random_pipeline(
    arch: str = "tiny", seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """A randomly initialised SD-1.x pipeline of the given architecture.

    ``sd15`` with ``device="meta"`` builds the networks without allocating weights (config checks).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = architecture(arch)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    if str(device) != "meta":
        # Random UNets predict noise of wild magnitude; shrink the output layer so that
        # sampling stays in range and pictures are at least images (still meaningless).
        with torch.no_grad():
            unet.conv_out.weight.mul_(0.1)
        if dtype != torch.float32:
            unet, vae, text_encoder = (m.to(dtype=dtype) for m in (unet, vae, text_encoder))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(spec.pad_token),
        unet=unet,
        scheduler=DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": spec.prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_model(
    out_dir: str | os.PathLike[str],
    arch: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    force: bool = False,
) -> Path:
    """Write a random pipeline as an ordinary diffusers folder that ``--base-model PATH`` loads."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SelfageError(f"{out} is a file, not a folder; choose a new or empty folder for the model.")
    if (out / "model_index.json").exists() and not force:
        raise SelfageError(f"{out} already holds a model; pass --force to overwrite it or choose another folder.")
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        raise SelfageError(f"{out} is not empty; choose an empty or new folder.")
    pipe = build_random_pipeline(arch, seed=seed, device=device)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
