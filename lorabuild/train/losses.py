"""Noise and loss helpers, on tensors and numbers only (no config).

Facts from sd-scripts ``library/custom_train_functions.py`` (commit 48d368f) and the
papers they cite.
"""
from __future__ import annotations


def offset_noise(noise, offset: float, generator=None, random_strength: bool = False,
                 adaptive_scale: float | None = None, latent=None):
    """Noise offset (crosslabs.org/blog/diffusion-with-offset-noise; kohya ``noise_offset``):
    add ``offset · N(0, 1)`` per channel (of one sample or a batch), constant over the image, so the model
    learns to shift overall brightness.

    kohya's ``apply_noise_offset`` options: ``random_strength`` (``noise_offset_random_strength``)
    draws the offset from U[0, offset) first; ``adaptive_scale`` (``adaptive_noise_scale``) makes
    each channel's offset ``offset + adaptive_scale · |mean of the latent's channel|``, floored at 0.
    kohya draws the strength once per batch; here it is drawn per sample, like all else."""
    import torch

    if offset == 0:
        return noise
    if random_strength:
        offset = float(torch.rand((), generator=generator)) * offset
    if adaptive_scale is not None:
        mean = latent.float().mean(dim=(-2, -1), keepdim=True).abs().to(noise.device)
        offset = (offset + adaptive_scale * mean).clamp(min=0.0).to(noise.dtype)
    shift = torch.randn(noise.shape[:-2] + (1, 1), generator=generator).to(noise.device, noise.dtype)
    return noise + offset * shift


def perturbed_noise(noise, gamma: float | None, generator=None, random_strength: bool = False):
    """Input perturbation (Ning et al. 2023, arXiv:2301.11706; kohya ``ip_noise_gamma``): the noise
    the noisy input is made from, ``noise + γ · N(0, 1)``; the loss's target stays ``noise``.
    ``random_strength`` (kohya ``ip_noise_gamma_random_strength``) draws γ from U[0, gamma) first."""
    import torch

    if not gamma:
        return noise
    if random_strength:
        gamma = float(torch.rand((), generator=generator)) * gamma
    return noise + gamma * torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)


def timestep_range(min_timestep: int | None, max_timestep: int | None, n_timesteps: int) -> tuple[int, int]:
    """kohya's ``min_timestep``/``max_timestep``: timesteps are drawn from [low, high); unset ends
    are 0 and the schedule's length."""
    low = 0 if min_timestep is None else min_timestep
    high = n_timesteps if max_timestep is None else max_timestep
    if not 0 <= low < high <= n_timesteps:
        raise ValueError(f"train.min_timestep/max_timestep: [{low}, {high}) is not a range within the schedule's "
                         f"{n_timesteps} timesteps")
    return low, high


def snr(alphas_cumprod, timesteps):
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep; floored at 1e-8 so a zero-terminal-SNR
    schedule's last step (SNR 0) gives finite weights (SD's own smallest SNR is about 0.005)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return (a / (1.0 - a)).clamp(min=1e-8)


def min_snr_weights(alphas_cumprod, timesteps, gamma: float, v_prediction: bool):
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv:2303.09556; kohya ``apply_snr_weight``):
    ``min(SNR, γ) / SNR`` for ε-prediction, ``min(SNR, γ) / (SNR + 1)`` for v-prediction."""
    import torch

    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1.0) if v_prediction else clipped / s


def per_sample_loss(pred, target, loss_type: str, huber_c: float, mask=None):
    """Mean loss per sample: ``l2`` (MSE), ``l1``, or ``huber`` (kohya's pseudo-Huber,
    ``2c(√((x−y)² + c²) − c)``, quadratic near 0 and linear far out).

    ``mask`` (``[B, h, w]`` at latent size, in [0, 1]) weights each position's loss before the
    mean, as kohya's ``apply_masked_loss`` does: the mean still divides by every position, so
    a half-transparent image's loss is half that of its opaque part, not renormalised."""
    import torch

    diff = pred.float() - target.float()
    if loss_type == "l2":
        per = diff.pow(2)
    elif loss_type == "l1":
        per = diff.abs()
    else:
        per = 2 * huber_c * (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c)
    if mask is not None:
        per = per * mask.to(per.device, per.dtype).unsqueeze(1)  # one mask for every latent channel
    return per.mean(dim=tuple(range(1, per.ndim)))


def multires_noise(noise, iterations: int, discount: float, generator=None):
    """Multi-resolution ("pyramid") noise (wandb.ai/johnowhitaker/multires_noise; kohya
    ``multires_noise_iterations``/``_discount``): add noise drawn at ever coarser random
    scales, upsampled, weighted by ``discount**i``; the sum is renormalised to unit std.
    ``noise`` is one sample (C, H, W) or a batch."""
    import torch
    import torch.nn.functional as F

    if not iterations:
        return noise
    x = noise if noise.ndim == 4 else noise[None]
    b, c, h, w = x.shape
    out = x.clone()
    hh, ww = h, w
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2  # a scale factor in [2, 4)
        hh, ww = max(1, int(hh / r**i)), max(1, int(ww / r**i))  # shrinking as kohya does, compounded
        coarse = torch.randn((b, c, hh, ww), generator=generator).to(x.device, x.dtype)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hh == 1 or ww == 1:
            break
    out = out / out.std()
    return out if noise.ndim == 4 else out[0]


def debiased_weights(alphas_cumprod, timesteps, v_prediction: bool):
    """Debiased estimation loss weights (Yu et al. 2023, arXiv:2310.08442; kohya
    ``debiased_estimation_loss``): ``1/√SNR`` (SNR capped at 1000), ``1/(SNR+1)`` for v-prediction."""
    import torch

    s = snr(alphas_cumprod, timesteps).clamp(max=1000.0)  # not a tensor made from a number: on a GPU each one is a wait
    return 1.0 / (s + 1.0) if v_prediction else 1.0 / torch.sqrt(s)
