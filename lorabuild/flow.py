"""Rectified flow (flow matching), the objective FLUX.1 and SD 3.x are trained with: tensors and
numbers only (torch, no diffusers), shared by every flow family.

The noisy input is the straight line between the image and the noise, ``x_σ = (1 − σ)·x₀ + σ·ε``
with σ ∈ [0, 1], and the model predicts its velocity ``ε − x₀`` (diffusers'
FlowMatchEulerDiscreteScheduler, kohya ``flux_train_utils.get_noisy_model_input_and_timesteps``
with ``model_prediction_type: raw``).

σ is drawn per sample by ``train.timestep_sampling`` (kohya's names):

- ``uniform``: σ ~ U[0, 1)
- ``sigmoid``: σ = sigmoid(s·n), n ~ N(0, 1), s = ``train.sigmoid_scale``
- ``logit_normal``: σ = sigmoid(m + d·n) with ``train.logit_mean``/``train.logit_std``
  (SD3's paper; diffusers ``compute_density_for_timestep_sampling``)
- ``mode``: u ~ U[0, 1), σ = 1 − u − c·(cos²(πu/2) − 1 + u), c = ``train.mode_scale`` (same source)
- ``shift``: ``sigmoid``, then the static shift below (kohya's ``shift``)
- ``flux_shift``: ``sigmoid``, then FLUX's resolution-dependent shift: μ linear in the packed image
  sequence length through (256, 0.5) and (4096, 1.15), σ' = e^μ / (e^μ + (1/σ − 1)) (BFL's
  ``time_shift``, kohya ``flux_shift``, diffusers ``calculate_shift`` + ``use_dynamic_shifting``)

``train.discrete_flow_shift`` (kohya's name) shifts σ' = k·σ / (1 + (k − 1)·σ) after any sampler but
``flux_shift`` (1 = none); larger k trains more at high noise, as SD3's large resolutions need.

Loss weighting ``train.weighting_scheme`` (diffusers ``compute_loss_weighting_for_sd3``): ``none``;
``sigma_sqrt``: σ⁻²; ``cosmap``: 2 / (π·(1 − 2σ + 2σ²)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLINGS = ("uniform", "sigmoid", "logit_normal", "mode", "shift", "flux_shift")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# FLUX's shift line (BFL flux/sampling.py get_lin_function; diffusers FluxPipeline's scheduler config:
# base_image_seq_len, base_shift, max_image_seq_len, max_shift)
FLUX_SHIFT_LINE = (256, 0.5, 4096, 1.15)
SIGMA_FLOOR = 1e-5  # σ = 0 is the clean image: nothing to learn, and 1/σ is infinite


@dataclass(frozen=True)
class FlowSettings:
    """The train section's flow settings, unset ones filled from the family's defaults."""

    timestep_sampling: str = "uniform"
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # kohya's and diffusers' default
    discrete_flow_shift: float = 1.0
    weighting_scheme: str = "none"
    guidance_scale: float = 1.0  # a guidance-distilled model's embedded guidance (FLUX.1 dev)

    @classmethod
    def of(cls, train: dict, defaults: dict | None = None) -> FlowSettings:
        """From ``train`` (null = the family's default in ``defaults``, else the class's)."""
        names = cls.__dataclass_fields__
        values = {**{k: v for k, v in (defaults or {}).items() if k in names},
                  **{k: train[k] for k in names if train.get(k) is not None}}
        s = cls(**values)
        if s.timestep_sampling not in SAMPLINGS:
            raise ValueError(f"train.timestep_sampling: {s.timestep_sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if s.weighting_scheme not in WEIGHTINGS:
            raise ValueError(f"train.weighting_scheme: {s.weighting_scheme!r} is not one of {', '.join(WEIGHTINGS)}")
        return s

    def keyed(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def noisy(x0, noise, sigma):
    """x_σ = (1 − σ)·x₀ + σ·ε, σ per sample (``[B]``)."""
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def target(x0, noise):
    """The velocity the model learns: ε − x₀."""
    return noise - x0


def static_shift(sigma, shift: float):
    """σ' = k·σ / (1 + (k − 1)·σ) (SD3's resolution shift; diffusers' ``shift``, kohya discrete_flow_shift)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flux_mu(seq_len: int, line: tuple = FLUX_SHIFT_LINE) -> float:
    """μ of an image whose packed sequence has ``seq_len`` tokens: on the line through (256, 0.5) and (4096, 1.15)."""
    x1, y1, x2, y2 = line
    m = (y2 - y1) / (x2 - x1)
    return m * seq_len + (y1 - m * x1)


def time_shift(mu: float, sigma):
    """σ' = e^μ / (e^μ + (1/σ − 1)) (BFL ``time_shift`` with exponent 1)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


def packed_len(latent_h: int, latent_w: int, patch: int = 2) -> int:
    """FLUX's image sequence length: latents are packed ``patch``×``patch`` into tokens."""
    return (latent_h // patch) * (latent_w // patch)


def draw_sigma(s: FlowSettings, generator, n: int = 1, seq_len: int | None = None):
    """``n`` σ values drawn with ``generator`` (on the CPU), by ``s.timestep_sampling``; ``seq_len``
    (:func:`packed_len`) is needed by ``flux_shift``."""
    import torch

    kind = s.timestep_sampling
    if kind == "uniform":
        sigma = torch.rand((n,), generator=generator)
    elif kind in ("sigmoid", "shift", "flux_shift"):
        sigma = torch.sigmoid(s.sigmoid_scale * torch.randn((n,), generator=generator))
    elif kind == "logit_normal":
        sigma = torch.sigmoid(s.logit_mean + s.logit_std * torch.randn((n,), generator=generator))
    else:  # mode
        u = torch.rand((n,), generator=generator)
        sigma = 1.0 - u - s.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    sigma = sigma.clamp(SIGMA_FLOOR, 1.0)
    if kind == "flux_shift":
        if seq_len is None:
            raise ValueError("train.timestep_sampling: flux_shift needs the image's sequence length")
        return time_shift(flux_mu(seq_len), sigma)
    return static_shift(sigma, s.discrete_flow_shift) if s.discrete_flow_shift != 1.0 else sigma


def loss_weight(scheme: str, sigma):
    """Per-sample loss weights for σ (``[B]``)."""
    import torch

    if scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma.float() + 2.0 * sigma.float() ** 2))
    return torch.ones_like(sigma, dtype=torch.float32)


def _per_sample(sigma, like):
    return sigma.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
