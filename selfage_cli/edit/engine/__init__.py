"""The editing engine's public face: encode, invert, edit all ages, decode.

The stage (``selfage_cli.edit.stage``) calls only these functions::

    latent = encode_image(pipe, image)               # or let invert() encode
    inversion = invert(pipe, image, prompts.source, mode="null-text")
    result = edit_ages(pipe, inversion, prompts, settings=P2PSettings(), max_batch=None)
    result.images[0]  # source reconstruction; result.images[1 + k] is target k

The method (reference behaviour, the maths and its quirks) is described in docs/method.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from selfage_cli.edit.engine.ddim import model_device
from selfage_cli.edit.engine.inversion import Inversion, Progress, invert_latent
from selfage_cli.edit.engine.p2p import EditResult, P2PSettings, edit_latents
from selfage_cli.edit.prompts import EditPrompts
from selfage_cli.models import native_resolution

__all__ = [
    "EditResult",
    "Inversion",
    "P2PSettings",
    "decode_latents",
    "edit_ages",
    "encode_image",
    "invert",
]


@torch.no_grad()
def encode_image(pipe: Any, image: PIL.Image.Image) -> Tensor:
    """The photo resized to the model's native resolution → VAE posterior mean × scaling factor, fp32.

    Returns (1, C, h, w) on the pipeline's device.
    """
    size = native_resolution(pipe)
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), PIL.Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None]
    vae = pipe.vae
    vae_param = next(vae.parameters())
    posterior = vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist
    return (posterior.mean * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latents(pipe: Any, latents: Tensor) -> list[PIL.Image.Image]:
    """Latents (N, C, h, w) / scaling factor → VAE decoder → N RGB images."""
    vae = pipe.vae
    vae_param = next(vae.parameters())
    images: list[PIL.Image.Image] = []
    for latent in latents:
        pixels = vae.decode((latent[None] / vae.config.scaling_factor).to(vae_param.device, vae_param.dtype)).sample
        array = ((pixels[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        images.append(PIL.Image.fromarray(array.permute(1, 2, 0).cpu().numpy()))
    return images


def invert(
    pipe: Any,
    image: PIL.Image.Image | Tensor,
    prompt: str,
    *,
    mode: str = "null-text",
    steps: int = 50,
    guidance: float = 7.5,
    inner_steps: int = 10,
    progress: Progress = None,
    keep_trajectory: bool = False,
    compile_unet: bool | dict[str, Any] = False,
    cuda_graph: bool = True,
) -> Inversion:
    """Invert a photo (PIL image, or an already encoded latent) with ``prompt``.

    ``mode``: ``null-text`` (the paper's), ``negative-prompt`` or ``direct`` (no optimisation; direct
    keeps the DDIM-inversion latents, which its editing's source branch follows). ``progress`` is
    called as ``progress(done, total)`` after each DDIM step (inversion, then optimisation).
    ``keep_trajectory`` keeps the T + 1 DDIM-inversion latents; ``compile_unet`` (off by default)
    runs the inversion's UNet through ``torch.compile`` (``True``: ``mode="reduce-overhead"``);
    ``cuda_graph`` (on; acts only on a CUDA GPU) replays its calls from CUDA graphs, checked against
    eager execution.
    """
    latent = image if isinstance(image, Tensor) else encode_image(pipe, image)
    latent = latent.to(model_device(pipe), torch.float32)
    return invert_latent(
        pipe,
        latent,
        prompt,
        mode=mode,
        steps=steps,
        guidance=guidance,
        inner_steps=inner_steps,
        progress=progress,
        keep_trajectory=keep_trajectory,
        compile_unet=compile_unet,
        cuda_graph=cuda_graph,
    )


def edit_ages(
    pipe: Any,
    inversion: Inversion,
    prompts: EditPrompts,
    *,
    settings: P2PSettings | None = None,
    max_batch: int | None = None,
    guidance: float = 7.5,
    progress: Progress = None,
    decode: bool = True,
) -> EditResult:
    """Prompt-to-prompt edit of an inverted photo to every target age of ``prompts``.

    One pass holds the source branch and one branch per target (× 2 for guidance); ``max_batch``
    caps the targets per pass (each pass re-runs the source branch; 1 = the reference's per-age
    loop). ``progress(done, total)`` is called after each UNet step (total = steps × passes).
    """
    result = edit_latents(
        pipe,
        inversion,
        prompts,
        settings=settings or P2PSettings(),
        max_batch=max_batch,
        guidance=guidance,
        progress=progress,
    )
    if decode:
        result.images = decode_latents(pipe, result.latents)
    return result
