"""What the trainer noises, predicts and weighs, by the family's objective (``Family.objective``):
``eps``/``v`` (DDPM: SD 1.x/2.x/SDXL, the scheduler's prediction type) or ``flow`` (rectified
flow: FLUX.1, SD 3.x; lorabuild/flow.py). The training loop and the validation loss ask one
object and never branch on the model.

``draw`` gives one sample's timestep from that sample's generator (an integer step for DDPM, σ
for flow); the family's ``predict`` turns it into what its denoiser takes.
"""
from __future__ import annotations

from . import flow
from .train.losses import debiased_weights, min_snr_weights, timestep_range

VAL_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed, spread over the schedule (σ = t/1000 for flow)


class ObjectiveError(ValueError):
    """A train setting that does not apply to this model's objective (the message names it)."""


class DDPM:
    """ε- or v-prediction on the model's DDPM noise schedule."""

    kind = "ddpm"

    def __init__(self, sched, tr: dict):
        self.sched = sched
        self.tr = tr
        self.v_pred = sched.config.prediction_type == "v_prediction"
        self.n = sched.config.num_train_timesteps
        self.low, self.high = timestep_range(tr.get("min_timestep"), tr.get("max_timestep"), self.n)

    def draw(self, g, latent):
        import torch

        return torch.randint(self.low, self.high, (1,), generator=g)

    def noisy_target(self, latents, noise_in, noise, t):
        noisy = self.sched.add_noise(latents, noise_in, t)
        return noisy, (self.sched.get_velocity(latents, noise, t) if self.v_pred else noise)

    def weighted(self, per_sample, t):
        """min-SNR-γ and debiased estimation, when set."""
        if self.tr.get("min_snr_gamma"):
            per_sample = per_sample * min_snr_weights(self.sched.alphas_cumprod, t, self.tr["min_snr_gamma"], self.v_pred)
        if self.tr.get("debiased_estimation"):
            per_sample = per_sample * debiased_weights(self.sched.alphas_cumprod, t, self.v_pred)
        return per_sample

    def fixed_steps(self, device):
        import torch

        return torch.tensor([t * self.n // 1000 for t in VAL_TIMESTEPS], device=device)

    def added(self, added: dict | None, batch: int) -> dict | None:
        return added


class Flow:
    """Rectified flow: σ from ``train.timestep_sampling``, target ε − x₀, ``train.weighting_scheme``;
    a guidance-distilled model (FLUX.1 dev) gets ``train.guidance_scale`` as its embedded guidance."""

    kind = "flow"

    def __init__(self, settings: flow.FlowSettings, tr: dict):
        for name in ("min_snr_gamma", "debiased_estimation", "zero_terminal_snr", "min_timestep", "max_timestep"):
            if tr.get(name):
                raise ObjectiveError(f"train.{name} applies to DDPM models (SD 1.x/2.x/SDXL); this model is trained "
                                     "with rectified flow: use train.timestep_sampling and train.weighting_scheme")
        self.s = settings

    def draw(self, g, latent):
        return flow.draw_sigma(self.s, g, 1, flow.packed_len(latent.shape[-2], latent.shape[-1]))

    def noisy_target(self, latents, noise_in, noise, t):
        return flow.noisy(latents, noise_in, t), flow.target(latents, noise)

    def weighted(self, per_sample, t):
        if self.s.weighting_scheme == "none":
            return per_sample
        return per_sample * flow.loss_weight(self.s.weighting_scheme, t).to(per_sample.device)

    def fixed_steps(self, device):
        import torch

        return torch.tensor([t / 1000 for t in VAL_TIMESTEPS], device=device)

    def added(self, added: dict | None, batch: int) -> dict | None:
        import torch

        return {**(added or {}), "guidance": torch.full((batch,), float(self.s.guidance_scale))}


def make(fam, sched, tr: dict):
    """The objective of family ``fam``'s model with noise scheduler ``sched`` and train section ``tr``."""
    if fam.objective(dict(sched.config)) == "flow":
        return Flow(flow.FlowSettings.of(tr, fam.flow_defaults), tr)
    return DDPM(sched, tr)
