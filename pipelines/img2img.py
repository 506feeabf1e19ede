"""img2img's pixel side: the crop of an input image to the VAE's grid, and its start latent.

ComfyUI's LoadImage → VAEEncode, as docs/sampling.md (img2img) gives it: each side is cropped to a
multiple of 8 around the centre (offset (side mod 8) // 2, so an odd remainder loses its extra column
on the far side), pixels go to [-1, 1], and the encoder's posterior *mode* is taken — no sampling, so
the same image always gives the same latent. The output image has the cropped size.
"""

from __future__ import annotations

import numpy as np
import torch

VAE_GRID = 8
MIN_SIDE = 64  # below this the SD3 latent is under 8x8, smaller than anything the API serves


def cropped_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) an input of this size is cropped to, which is also the output's size."""
    return width - width % VAE_GRID, height - height % VAE_GRID


def crop_to_grid(image: np.ndarray) -> np.ndarray:
    """The centre crop of an HxWxC image to multiples of 8 (a view; no copy)."""
    height, width = image.shape[:2]
    new_width, new_height = cropped_size(width, height)
    top, left = (height % VAE_GRID) // 2, (width % VAE_GRID) // 2
    return image[top : top + new_height, left : left + new_width]


def to_vae_input(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 → [1, 3, H, W] float32 in [-1, 1], cropped to the grid."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"an init image must be HxWx3 uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"an init image needs sides of at least {MIN_SIDE} px, got {width}x{height}")
    pixels = torch.from_numpy(np.array(crop_to_grid(image))).to(torch.float32) / 255.0  # a writable copy
    return (pixels * 2.0 - 1.0).permute(2, 0, 1).unsqueeze(0)


def start_latent(*, latent: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x₀ = σ₀·noise + (1 − σ₀)·latent: the flow model's noising of the image latent to the first sigma."""
    return sigma * noise + (1.0 - sigma) * latent
