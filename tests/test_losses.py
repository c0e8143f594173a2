"""Noise offset, min-SNR weighting and the loss types do what kohya's do."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lorabuild.train.losses import min_snr_weights, offset_noise, per_sample_loss, perturbed_noise, snr, timestep_range

SD = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_min_snr_weights_clip_high_snr_only():
    t = torch.tensor([0, 50, 300, 999])
    s = snr(SD.alphas_cumprod, t)
    assert s[0] > 5 > s[3]  # early timesteps are nearly clean: high SNR
    w = min_snr_weights(SD.alphas_cumprod, t, 5.0, v_prediction=False)
    torch.testing.assert_close(w, torch.where(s > 5, 5 / s, torch.ones_like(s)))
    wv = min_snr_weights(SD.alphas_cumprod, t, 5.0, v_prediction=True)
    torch.testing.assert_close(wv, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    assert w[0] < 0.1 and w[3] == 1.0


def test_noise_offset_shifts_each_channel_by_a_constant():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 8, 8, generator=g)
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    shift = out - noise
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift))
    assert shift.abs().max() > 0
    assert offset_noise(noise, 0.0) is noise


def test_loss_types():
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([0.01, 10.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    l2, l1 = per_sample_loss(pred, target, "l2", 0.1), per_sample_loss(pred, target, "l1", 0.1)
    torch.testing.assert_close(l2, torch.tensor([1e-4, 100.0]))
    torch.testing.assert_close(l1, torch.tensor([0.01, 10.0]))
    hub = per_sample_loss(pred, target, "huber", 0.1)
    assert abs(hub[0] - 1e-4) < 1e-5  # quadratic near zero, like l2
    assert abs(hub[1] - 2 * 0.1 * 10) < 0.05  # linear far out: ≈ 2c|x|, far below l2's 100


def test_masked_loss_counts_only_the_opaque_half():
    """kohya ``apply_masked_loss``: loss × mask, then the mean over every position. With the left
    half transparent, the loss is the opaque half's sum over all positions; the error on the
    transparent half does not count at all."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.ones(2, 8, 8)
    mask[:, :, :4] = 0
    for kind in ("l2", "l1", "huber"):
        masked = per_sample_loss(pred, target, kind, 0.1, mask)
        opaque = per_sample_loss(pred[..., 4:], target[..., 4:], kind, 0.1)  # the mean over the opaque half
        torch.testing.assert_close(masked, opaque * 0.5)
        wild = pred.clone()
        wild[..., :4] += 100  # anything at all where the image is transparent
        torch.testing.assert_close(per_sample_loss(wild, target, kind, 0.1, mask), masked)
    torch.testing.assert_close(per_sample_loss(pred, target, "l2", 0.1, torch.ones(2, 8, 8)),
                               per_sample_loss(pred, target, "l2", 0.1))


def test_bucket_mask_follows_the_pixels_resize_and_crop(tmp_path):
    """The alpha of a 200×100 image, left half transparent: resized like its working copy and
    bucket, cropped, and averaged to latent size; an image without alpha has no mask."""
    import numpy as np
    from PIL import Image

    from lorabuild.pixels import bucket_mask

    rgba = np.full((100, 200, 4), 255, dtype=np.uint8)
    rgba[:, :100, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # working copy 160×80, resized to 144×72 for a 128×64 bucket cropped from x = 8
    m = bucket_mask(tmp_path / "a.png", [160, 80], "lanczos", [144, 72], (8, 4, 136, 68), "area", (8, 16))
    assert m.shape == (8, 16)
    # bucket pixels 0..63 transparent (x 8..71 of 144, the border at 72), 64..127 opaque
    assert m[:, :7].max() < 0.02 and m[:, 9:].min() > 0.98
    Image.new("RGB", (200, 100), "red").save(tmp_path / "b.png")
    assert bucket_mask(tmp_path / "b.png", [160, 80], "lanczos", [144, 72], (8, 4, 136, 68), "area", (8, 16)) is None


def test_noise_offset_random_strength_and_adaptive_scale_follow_kohyas_formula():
    noise, latent = torch.randn(4, 8, 8), torch.randn(4, 8, 8) + torch.tensor([2.0, -1.0, 0.0, 0.5]).view(4, 1, 1)
    g = torch.Generator().manual_seed(3)
    u, shift = torch.rand((), generator=g), torch.randn(4, 1, 1, generator=g)  # the draws, in their order
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(3), random_strength=True)
    torch.testing.assert_close(out, noise + float(u) * 0.1 * shift)
    # adaptive: offset + scale · |channel mean of the latent|, floored at 0 (a negative scale can cancel it)
    shift = torch.randn(4, 1, 1, generator=torch.Generator().manual_seed(4))
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(4), adaptive_scale=-0.1, latent=latent)
    per_channel = (0.1 - 0.1 * latent.mean(dim=(1, 2), keepdim=True).abs()).clamp(min=0)
    torch.testing.assert_close(out, noise + per_channel * shift)
    assert (out - noise)[0].abs().max() == 0 and (out - noise)[2].abs().max() > 0  # channel 0's mean 2 cancels it


def test_input_perturbation_is_noise_plus_gamma_times_a_fresh_draw():
    noise = torch.randn(4, 8, 8)
    extra = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(perturbed_noise(noise, 0.1, torch.Generator().manual_seed(5)), noise + 0.1 * extra)
    g = torch.Generator().manual_seed(6)
    u, extra = torch.rand((), generator=g), torch.randn(4, 8, 8, generator=g)
    torch.testing.assert_close(perturbed_noise(noise, 0.1, torch.Generator().manual_seed(6), random_strength=True),
                               noise + float(u) * 0.1 * extra)
    assert perturbed_noise(noise, None) is noise and perturbed_noise(noise, 0.0) is noise


CAPTION_AS_IS = {"dropout_every_n_epochs": 0, "dropout": 0, "wildcards": False, "shuffle": False, "tag_dropout": 0}


def _batch_inputs_of(tmp_path, train: dict, n: int = 300):
    """What the training loop's ``_batch_inputs`` draws for ``n`` samples of one cached image."""
    import random

    from safetensors.torch import save_file

    import types

    from lorabuild import objective
    from lorabuild.train import loop as trainer
    from lorabuild.train.plan import Sample

    save_file({"latent": torch.randn(4, 4, 4), "latent_flip": torch.randn(4, 4, 4)}, str(tmp_path / "lat.safetensors"))
    save_file({"hidden": torch.randn(77, 32)}, str(tmp_path / "emb.safetensors"))
    tr = {"seed": 1, "noise_offset": 0, "multires_noise_iterations": 0, "prior_loss_weight": 1.0, **train}
    inp = trainer.TrainInputs(
        model_dir=tmp_path, arch="sd1", device=torch.device("cpu"), samples=[], latent_path={"a": tmp_path / "lat.safetensors"},
        pixels=None, caption={"a": "x"}, caption_opts={"a": CAPTION_AS_IS},
        embedding_path={"x": tmp_path / "emb.safetensors"}, cfg={"train": tr, "latents": {"flip": False}},
        plan=None)
    random.seed(0)
    sched = types.SimpleNamespace(config=types.SimpleNamespace(prediction_type="epsilon", num_train_timesteps=1000))
    obj = objective.DDPM(sched, tr)
    return trainer._batch_inputs(inp, [(Sample("a", (32, 32), 1), rep) for rep in range(n)], 1, obj, [], [], None)


def test_training_draws_timesteps_within_min_and_max(tmp_path):
    t = _batch_inputs_of(tmp_path, {"min_timestep": 500, "max_timestep": 503})[2]
    assert set(t.tolist()) == {500, 501, 502}  # [min, max): both ends reached, max itself never
    t = _batch_inputs_of(tmp_path, {"max_timestep": 10})[2]
    assert int(t.min()) >= 0 and int(t.max()) <= 9
    full = _batch_inputs_of(tmp_path, {})[2]
    assert int(full.max()) > 900  # unset: the whole schedule
    for low, high in ((5, 5), (0, 1001), (-1, 10)):
        with pytest.raises(ValueError, match="min_timestep/max_timestep"):
            timestep_range(low, high, 1000)


def test_input_perturbation_changes_the_noisy_input_only(tmp_path):
    plain = _batch_inputs_of(tmp_path, {}, n=4)
    ip = _batch_inputs_of(tmp_path, {"ip_noise_gamma": 0.1}, n=4)
    assert plain[7] is plain[1]  # off: the noisy input is made from the noise itself
    assert torch.equal(plain[1], ip[1]) and torch.equal(plain[2], ip[2])  # same target noise and timesteps
    diff = ip[7] - ip[1]
    assert 0.07 < float(diff.std()) < 0.13  # γ · N(0, 1)
