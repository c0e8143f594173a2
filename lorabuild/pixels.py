"""A working copy → the bucket-sized pixels (and alpha mask) the VAE encodes, and the encoding.

The latents stage encodes every image this way; the trainer does the same for kohya's
``random_crop`` (a window encoded at each step, not cached). Here, below both, so the trainer
never imports a stage.
"""
from __future__ import annotations


def bucket_pixels(path, resized, crop, interpolation: str, data: bytes | None = None):
    """The bucket-sized RGB image of a working copy (decoded from ``data``, its checked bytes,
    when given): resize to ``resized``, then crop to ``crop``."""
    import io

    from PIL import Image

    from .cache import checked_read
    from .images import RESAMPLE

    def read(p):
        with Image.open(p if data is None else io.BytesIO(data)) as im:
            return im.convert("RGB")

    im = checked_read("resize", path, read)
    return im.resize(tuple(resized), RESAMPLE[interpolation]).crop(tuple(crop))


def bucket_mask(source, working_size, resize_interpolation: str, resized, crop, interpolation: str, latent_hw,
                data: bytes | None = None):
    """The alpha mask of ``source`` as its latent sees it: a ``[h, w]`` float tensor in [0, 1] at
    latent size, or None when the image has no alpha. The alpha goes through the working copy's
    resize and then the bucket's resize and crop, as the pixels do; the final area average
    is kohya's ``F.interpolate(mask, size=latent size, mode="area")`` (``apply_masked_loss``,
    custom_train_functions.py), done once here instead of at every step."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .images import RESAMPLE, load_alpha

    alpha = load_alpha(source, data)
    if alpha is None:
        return None
    if alpha.size != tuple(working_size):
        alpha = alpha.resize(tuple(working_size), RESAMPLE[resize_interpolation])
    alpha = alpha.resize(tuple(resized), RESAMPLE[interpolation]).crop(tuple(crop))
    m = torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(m, size=tuple(latent_hw), mode="area")[0, 0].contiguous()


def to_tensor(images):
    """PIL images → a ``[B, 3, H, W]`` float tensor in [-1, 1], as the VAE expects."""
    import numpy as np
    import torch

    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)


def encode(vae, x):
    """Latents already normalised as the denoiser takes them (the distribution's mean): multiplied
    by the VAE's scaling factor, its shift factor subtracted first where it has one (FLUX.1, SD 3.5)."""
    mean = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    return (mean if shift is None else mean - shift) * vae.config.scaling_factor
