"""``train.reg_target: base``: regularization items are fitted to the base model's own prediction
(lorabuild/train/preserve.py), through the real build and on a tiny UNet."""
from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from lorabuild.lora.network import LoRANetwork
from lorabuild.train.losses import per_sample_loss
from lorabuild.train.plan import Sample
from lorabuild.train.preserve import base_targets, reg_rows


def test_reg_items_loss_is_zero_at_step_0_and_grows_only_as_the_lora_moves_the_base(tiny_unet_te):
    unet, te = tiny_unet_te
    net = LoRANetwork(unet, [te], dim=4, alpha=4)
    net.apply()
    try:
        predict = lambda x, t, h, added: unet(x, t, encoder_hidden_states=h).sample  # noqa: E731
        g = torch.Generator().manual_seed(3)
        noisy, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
        t, hidden = torch.tensor([10, 300, 600, 900]), torch.randn(4, 77, 32, generator=g)
        batch = [(Sample("a", (64, 64), 1), 0), (Sample("r1", (64, 64), 1, True), 0),
                 (Sample("b", (64, 64), 1), 0), (Sample("r2", (64, 64), 1, True), 0)]
        rows = reg_rows(batch)
        assert rows == [1, 3]
        off = torch.autocast("cpu", enabled=False)
        # step 0: every lora_up is zero, so the LoRA's prediction is the base's: the reg items' loss is 0
        # (to float rounding: the base pass runs on the reg rows alone, a batch of 2, not 4)
        target = base_targets(noise, rows, predict, net, noisy, t, hidden, None, off)
        pred = predict(noisy, t, hidden, None)
        loss = per_sample_loss(pred, target, "l2", 0.0)
        assert loss[1] < 1e-10 and loss[3] < 1e-10 and loss[0] > 0.1 and loss[2] > 0.1  # the others: against the noise
        assert torch.equal(target[[0, 2]], noise[[0, 2]]) and not target.requires_grad
        assert all(m.multiplier == 1.0 for m in net.loras)  # training's multiplier is back
        # after a step has moved the LoRA, the reg items' loss is its change of the base's output, and its
        # gradient reaches the LoRA's weights
        with torch.no_grad():
            for m in net.loras:
                m.lora_up.weight.normal_(0, 0.05, generator=g)
        target = base_targets(noise, rows, predict, net, noisy, t, hidden, None, off)
        pred = predict(noisy, t, hidden, None)
        loss = per_sample_loss(pred, target, "l2", 0.0)
        assert 0 < loss[1] < loss[0] and 0 < loss[3] < loss[2]
        with torch.no_grad():
            net.set_multiplier(0.0)
            base = predict(noisy, t, hidden, None)
            net.set_multiplier(1.0)
        assert torch.allclose(target[[1, 3]], base[[1, 3]], atol=1e-5)  # the base model's prediction
        loss[[1, 3]].sum().backward()
        assert any(m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().sum() > 0 for m in net.loras)
    finally:
        net.restore()


def _losses(ws) -> list[float]:
    with open(ws.root / "output" / "demo" / "loss.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _reg_project(d: dict, **train) -> None:
    """The tiny demo's red circles as the lesson, its blue squares as regularization images."""
    d["dataset"] = {"concepts": [{"path": "demo/10_redcircle shape", "repeats": 1},
                                 {"path": "demo/10_bluesquare shape", "repeats": 1, "is_reg": True}]}
    d["train"].update({"epochs": 1, "batch_size": 1, "prior_loss_weight": 1.0, **train})


def test_reg_target_base_fits_reg_items_to_the_base_in_a_real_build(demo):
    demo.edit(lambda d: _reg_project(d))
    demo.doit("train:demo", build="noise")
    out = demo.root / "output" / "demo" / "demo.safetensors"
    plain, noise_losses = load_file(str(out)), _losses(demo)
    demo.edit(lambda d: d["train"].update(reg_target="base"))
    demo.doit("train:demo", build="base")
    assert demo.report("train")["computed"] == 1  # a new setting, a new LoRA
    base_losses = _losses(demo)
    preserved = load_file(str(out))
    assert not all(torch.equal(plain[k], preserved[k]) for k in plain)
    # one item a step, seeded alike: the 8 steps on circles are drawn as in the noise run, the 8 on squares
    # are fitted to what the base predicts, whose distance is the LoRA's change, far below the noise's
    assert len(base_losses) == len(noise_losses) == 16
    low = sorted(range(16), key=lambda i: base_losses[i])[:8]
    assert max(base_losses[i] for i in low) < 0.1 * min(noise_losses[i] for i in low)
    assert base_losses[0] < 1e-10 or base_losses[0] == pytest.approx(noise_losses[0])  # step 1: a square's 0, or a circle's
    # back to noise: the first LoRA, restored, not trained again
    demo.edit(lambda d: d["train"].update(reg_target="noise"))
    demo.doit("train:demo", build="again")
    assert demo.report("train")["reused"] == 1
    assert all(torch.equal(plain[k], v) for k, v in load_file(str(out)).items())


def test_reg_target_base_with_the_text_encoder_trained_accumulation_and_ema(demo):
    """The text encoder trains (captions encoded each step, the base's by the text encoder with its LoRA
    off), two batches a step, and an EMA of the weights saved beside them."""
    settings = dict(gradient_accumulation_steps=2, ema={}, batch_size=2)
    demo.edit(lambda d: (_reg_project(d, **settings), d["network"].update(train_text_encoder=True)))
    demo.doit("train:demo", build="noise")
    out = demo.root / "output" / "demo"
    plain = load_file(str(out / "demo.safetensors"))
    demo.edit(lambda d: d["train"].update(reg_target="base"))
    demo.doit("train:demo", build="base")
    preserved, ema = load_file(str(out / "demo.safetensors")), load_file(str(out / "demo-ema.safetensors"))
    assert any(k.startswith("lora_te_") for k in preserved)
    assert not all(torch.equal(plain[k], preserved[k]) for k in plain)
    assert sorted(ema) == sorted(preserved) and not all(torch.equal(ema[k], preserved[k]) for k in ema)
    # 8 + 8 items in batches of 2 within buckets (8 batches or a few more), 2 batches a step
    assert 4 <= len(_losses(demo)) <= 6


def test_validate_refuses_reg_target_base_without_regularization_images(demo):
    demo.edit(lambda d: d["train"].update(reg_target="base"))
    proc = demo.lorabuild("validate")
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "train.reg_target" in said and "dataset.reg_dirs" in said
    assert "Traceback" not in said
