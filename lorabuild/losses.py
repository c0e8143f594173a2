"""Noise and loss helpers, on tensors and numbers only (no config).

Facts from sd-scripts ``library/custom_train_functions.py`` (commit 48d368f) and the
papers they cite.
"""
from __future__ import annotations


def offset_noise(noise, offset: float, generator=None):
    """Noise offset (crosslabs.org/blog/diffusion-with-offset-noise; kohya ``noise_offset``):
    add ``offset · N(0, 1)`` per channel (of one sample or a batch), constant over the image, so the model
    learns to shift overall brightness."""
    import torch

    if offset == 0:
        return noise
    shift = torch.randn(noise.shape[:-2] + (1, 1), generator=generator).to(noise.device, noise.dtype)
    return noise + offset * shift


def snr(alphas_cumprod, timesteps):
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod, timesteps, gamma: float, v_prediction: bool):
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv:2303.09556; kohya ``apply_snr_weight``):
    ``min(SNR, γ) / SNR`` for ε-prediction, ``min(SNR, γ) / (SNR + 1)`` for v-prediction."""
    import torch

    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1.0) if v_prediction else clipped / s


def per_sample_loss(pred, target, loss_type: str, huber_c: float):
    """Mean loss per sample: ``l2`` (MSE), ``l1``, or ``huber`` (kohya's pseudo-Huber,
    ``2c(√((x−y)² + c²) − c)``, quadratic near 0 and linear far out)."""
    import torch

    diff = pred.float() - target.float()
    if loss_type == "l2":
        per = diff.pow(2)
    elif loss_type == "l1":
        per = diff.abs()
    else:
        per = 2 * huber_c * (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c)
    return per.mean(dim=tuple(range(1, per.ndim)))
