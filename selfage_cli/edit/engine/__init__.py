"""The editing engine's public face: encode, invert, edit all ages, decode.

The stage (``selfage_cli.edit.stage``) calls only these functions::

    latent = encode_image(pipe, image)               # or let invert() encode
    inversion = invert(pipe, image, prompts.source, mode="null-text")
    result = edit_ages(pipe, inversion, prompts, settings=P2PSettings(), max_batch=None)
    result.images[0]  # source reconstruction; result.images[1 + k] is target k

The method (reference behaviour, the maths and its quirks) is described in docs/method.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from selfage_cli.edit.engine.ddim import model_device
from selfage_cli.edit.engine.inversion import Inversion, Progress, invert_latent
from selfage_cli.edit.engine.p2p import EditResult, P2PSettings, edit_latents
from selfage_cli.edit.prompts import EditPrompts
from selfage_cli.models import native_resolution

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

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
def encode_image(pipe: StableDiffusionPipeline, image: PIL.Image.Image) -> Tensor:
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
def decode_latents(pipe: StableDiffusionPipeline, latents: Tensor) -> list[PIL.Image.Image]:
    """Latents (N, C, h, w) / scaling factor → VAE decoder → N RGB images."""
    vae = pipe.vae
    vae_param = next(vae.parameters())
    images: list[PIL.Image.Image] = []
    for latent in latents:
        pixels = vae.decode((latent[None] / vae.config.scaling_factor).to(vae_param.device, vae_param.dtype)).sample
        array = ((pixels[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        images.append(PIL.Image.fromarray(array.permute(1, 2, 0).cpu().numpy()))
    return images


def invert(pipe: StableDiffusionPipeline, image: PIL.Image.Image | Tensor, prompt: str, **options: Any) -> Inversion:
    """Invert a photo (PIL image, or an already encoded latent) with ``prompt``.

    Args:
        image: the aligned photo, or its latent from :func:`encode_image`.
        prompt: the source prompt (``EditPrompts.source``).
        options: the keyword options of :func:`~selfage_cli.edit.engine.inversion.invert_latent` (mode,
            steps, guidance, inner_steps, progress, keep_trajectory, compile_unet, cuda_graph).

    Returns:
        The :class:`Inversion`: x_T, one null embedding per step, and how it ran.
    """
    latent = image if isinstance(image, Tensor) else encode_image(pipe, image)
    latent = latent.to(model_device(pipe), torch.float32)
    return invert_latent(pipe, latent, prompt, **options)


def edit_ages(
    pipe: StableDiffusionPipeline,
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

    One pass holds the source branch and one branch per target (× 2 for guidance).

    Args:
        inversion: the photo's inversion from :func:`invert` (same prompt as ``prompts.source``).
        prompts: the source prompt and one target prompt per age.
        settings: the prompt-to-prompt settings (replacement fractions, blend, re-weighting).
        max_batch: at most this many targets per pass (each pass re-runs the source branch; 1 = the
            reference's per-age loop); None: all in one pass.
        progress: called as ``progress(done, total)`` after each UNet step (total = steps × passes).
        decode: decode the latents to images (``result.images``).

    Returns:
        The :class:`EditResult`: latents (and images) of the source reconstruction, then one per target.
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
