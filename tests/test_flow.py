"""Rectified flow (lorabuild/flow.py, lorabuild/objective.py) against its formulas: no model."""
from __future__ import annotations

import math

import pytest
import torch

from lorabuild import flow, objective
from lorabuild.flow import FlowSettings


def _draw(n=20000, seq_len=None, **settings):
    return flow.draw_sigma(FlowSettings.of(settings), torch.Generator().manual_seed(0), n, seq_len)


def test_noisy_is_the_straight_line_and_target_its_velocity():
    x0, eps = torch.randn(3, 16, 4, 6), torch.randn(3, 16, 4, 6)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    x = flow.noisy(x0, eps, sigma)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], eps[2])
    assert torch.allclose(x[1], 0.75 * x0[1] + 0.25 * eps[1])
    # d x_σ / dσ = ε − x₀: a step along σ moves by the target
    v = flow.target(x0, eps)
    assert torch.allclose(flow.noisy(x0, eps, sigma + 0.1) - x, 0.1 * v, atol=1e-6)


def test_uniform_and_sigmoid_and_logit_normal_follow_their_distributions():
    u = _draw(timestep_sampling="uniform")
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    # sigmoid(scale·n): its logit is normal with std = scale
    s = _draw(timestep_sampling="sigmoid", sigmoid_scale=2.0)
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean()) < 0.05 and abs(logit.std() - 2.0) < 0.05
    ln = _draw(timestep_sampling="logit_normal", logit_mean=-0.5, logit_std=0.7)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean() + 0.5) < 0.03 and abs(logit.std() - 0.7) < 0.03
    # same generator, same normal: logit_normal(0, s) is sigmoid with scale s
    assert torch.allclose(_draw(timestep_sampling="logit_normal", logit_std=1.5),
                          _draw(timestep_sampling="sigmoid", sigmoid_scale=1.5))


def test_mode_sampling_is_diffusers_formula():
    scale = 1.29
    u = torch.rand((20000,), generator=torch.Generator().manual_seed(0))
    expected = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    got = _draw(timestep_sampling="mode", mode_scale=scale)
    assert torch.allclose(got, expected.clamp(flow.SIGMA_FLOOR, 1.0))
    # mode_scale 0 is uniform (mirrored)
    assert torch.allclose(_draw(timestep_sampling="mode", mode_scale=0.0), (1 - u).clamp(flow.SIGMA_FLOOR, 1.0))


def test_static_shift_formula_and_effect():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.static_shift(sigma, 3.0), 3 * sigma / (1 + 2 * sigma))
    assert torch.allclose(flow.static_shift(sigma, 1.0), sigma)
    assert torch.allclose(flow.static_shift(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    # "shift" is sigmoid then the static shift; discrete_flow_shift shifts uniform too
    base = _draw(n=100, timestep_sampling="sigmoid")
    assert torch.allclose(_draw(n=100, timestep_sampling="shift", discrete_flow_shift=3.0), flow.static_shift(base, 3.0))
    u = _draw(n=100, timestep_sampling="uniform")
    assert torch.allclose(_draw(n=100, timestep_sampling="uniform", discrete_flow_shift=2.0), flow.static_shift(u, 2.0))


@pytest.mark.parametrize("side, mu", [(256, 0.5), (1024, 1.15)])
def test_flux_shift_at_two_resolutions(side, mu):
    """A 256 px image: latents 32×32, packed 2×2 → 256 tokens, μ = 0.5; 1024 px: 4096 tokens, μ = 1.15."""
    n = flow.packed_len(side // 8, side // 8)
    assert n == (side // 16) ** 2
    assert flow.flux_mu(n) == pytest.approx(mu)
    base = _draw(n=50, timestep_sampling="sigmoid")
    got = _draw(n=50, seq_len=n, timestep_sampling="flux_shift")
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    assert torch.allclose(got, expected)
    # the static shift with k = e^μ is the same curve
    assert torch.allclose(got, flow.static_shift(base, math.exp(mu)), atol=1e-6)


def test_flux_shift_between_and_beyond_the_line():
    assert flow.flux_mu(2176) == pytest.approx((0.5 + 1.15) / 2)
    assert flow.flux_mu(8192) > 1.15  # extrapolated, as BFL's line is
    with pytest.raises(ValueError, match="sequence length"):
        _draw(n=1, timestep_sampling="flux_shift")


def test_loss_weighting_schemes():
    sigma = torch.tensor([0.2, 0.5, 0.8])
    assert torch.equal(flow.loss_weight("none", sigma), torch.ones(3))
    assert torch.allclose(flow.loss_weight("sigma_sqrt", sigma), sigma ** -2)
    assert torch.allclose(flow.loss_weight("cosmap", sigma), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)))


def test_settings_fill_from_family_defaults_and_name_bad_values():
    s = FlowSettings.of({"timestep_sampling": None, "guidance_scale": 2.5}, {"timestep_sampling": "flux_shift"})
    assert s.timestep_sampling == "flux_shift" and s.guidance_scale == 2.5 and s.sigmoid_scale == 1.0
    with pytest.raises(ValueError, match="train.timestep_sampling"):
        FlowSettings.of({"timestep_sampling": "sigma"})
    with pytest.raises(ValueError, match="train.weighting_scheme"):
        FlowSettings.of({"weighting_scheme": "logit_normal"})


def test_flow_objective_draws_noises_weighs_and_refuses_ddpm_options():
    obj = objective.Flow(FlowSettings.of({"timestep_sampling": "flux_shift", "weighting_scheme": "cosmap",
                                          "guidance_scale": 3.5}), {})
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(16, 32, 32)
    sigma = obj.draw(g, lat)
    base = torch.sigmoid(torch.randn((1,), generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(sigma, flow.time_shift(flow.flux_mu(256), base))
    x0, eps = lat[None], torch.randn(1, 16, 32, 32)
    noisy, tgt = obj.noisy_target(x0, eps, eps, sigma)
    assert torch.allclose(noisy, (1 - sigma) * x0 + sigma * eps) and torch.equal(tgt, eps - x0)
    assert torch.allclose(obj.weighted(torch.ones(1), sigma), flow.loss_weight("cosmap", sigma))
    assert obj.added({"pooled": 1}, 2)["guidance"].tolist() == [3.5, 3.5]
    with pytest.raises(objective.ObjectiveError, match="train.min_snr_gamma"):
        objective.Flow(FlowSettings(), {"min_snr_gamma": 5})


def test_sd_families_keep_their_ddpm_objective():
    from lorabuild.families import family

    assert family("sd1").objective({"prediction_type": "epsilon"}) == "eps"
    assert family("sd2").objective({"prediction_type": "v_prediction"}) == "v"
