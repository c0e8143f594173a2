"""Training options at kohya parity: network variants, optimizers, metadata modes, report, loss plot."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorabuild.lora import metadata
from lorabuild.train import optimizers
from lorabuild.lora.network import LoRANetwork


def test_locon_adds_the_resnet_and_resampler_convs_with_their_own_dim(tiny_unet_te):
    unet, te = tiny_unet_te
    plain = LoRANetwork(unet, [te], dim=4, alpha=2)
    locon = LoRANetwork(unet, [te], dim=4, alpha=2, conv_dim=3, conv_alpha=1)
    extra = {m.lora_name for m in locon.loras} - {m.lora_name for m in plain.loras}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in extra
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in extra
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in extra
    assert "lora_unet_mid_block_resnets_0_time_emb_proj" in extra  # a Linear in a ResNet block: ordinary dim
    by_name = {m.lora_name: m for m in locon.loras}
    conv = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.lora_down.weight.shape == (3, 32, 3, 3) and conv.lora_up.weight.shape == (32, 3, 1, 1)
    assert conv.scale == pytest.approx(1 / 3)
    assert by_name["lora_unet_mid_block_resnets_0_time_emb_proj"].lora_down.weight.shape[0] == 4
    # applied with zero-initialised lora_up, the UNet's output is unchanged; trained, it changes
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=h).sample
        locon.apply()
        same = unet(x, t, encoder_hidden_states=h).sample
        torch.nn.init.normal_(conv.lora_up.weight)
        changed = unet(x, t, encoder_hidden_states=h).sample
        locon.restore()
    assert torch.equal(before, same) and not torch.equal(before, changed)


def test_network_dropout_acts_only_while_training(tiny_unet_te):
    unet, te = tiny_unet_te
    net = LoRANetwork(unet, [te], dim=4, alpha=4, dropout=0.5)
    m = next(m for m in net.loras if isinstance(m.lora_down, torch.nn.Linear))
    torch.nn.init.normal_(m.lora_up.weight)
    x = torch.randn(2, 16, m.lora_down.weight.shape[1])
    m.apply_to()
    try:
        net.eval()
        assert torch.equal(m(x), m(x))
        net.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        assert not torch.equal(a, m(x))
    finally:
        m.restore()


def test_rank_and_module_dropout_follow_kohya_only_while_training_and_repeat_with_the_seed(tiny_unet_te):
    unet, te = tiny_unet_te
    net = LoRANetwork(unet, [te], dim=4, alpha=2, conv_dim=4, rank_dropout=0.25)
    lin = next(m for m in net.loras if isinstance(m.lora_down, torch.nn.Linear))
    conv = next(m for m in net.loras if isinstance(m.lora_down, torch.nn.Conv2d) and m.lora_down.kernel_size == (3, 3))
    for m in (lin, conv):
        torch.nn.init.normal_(m.lora_up.weight)
    xl = torch.randn(2, 16, lin.lora_down.weight.shape[1])
    xc = torch.randn(2, conv.lora_down.weight.shape[1], 8, 8)
    for m in (lin, conv):
        m.apply_to()
    try:
        with torch.no_grad():
            net.eval()
            base_l, base_c = lin._org_forward(xl), conv._org_forward(xc)
            full_l = base_l + lin.lora_up(lin.lora_down(xl)) * lin.scale
            torch.testing.assert_close(lin(xl), full_l)  # no dropout outside training
            net.train()
            torch.manual_seed(7)
            keep = torch.rand(2, 4) > 0.25  # one mask per sample over the rank, kohya's draw
            torch.manual_seed(7)
            out = lin(xl)
            torch.testing.assert_close(out, base_l + lin.lora_up(lin.lora_down(xl) * keep[:, None, :]) * lin.scale / 0.75)
            torch.manual_seed(8)
            keep = torch.rand(2, 4) > 0.25
            torch.manual_seed(8)
            torch.testing.assert_close(conv(xc), base_c + conv.lora_up(conv.lora_down(xc) * keep[:, :, None, None])
                                       * conv.scale / 0.75)
            torch.manual_seed(7)
            assert torch.equal(lin(xl), out)  # the same seed, the same masks
            # module dropout: the whole module skipped on a draw from the CPU generator, else the full LoRA
            for m in net.loras:
                m.rank_dropout, m.module_dropout = 0.0, 0.5
            torch.manual_seed(9)
            skipped = [bool(torch.rand(1) < 0.5) for _ in range(40)]
            torch.manual_seed(9)
            outs = [lin(xl) for _ in range(40)]
            assert 5 < sum(skipped) < 35
            assert all(torch.equal(o, base_l) if s else torch.allclose(o, full_l) for o, s in zip(outs, skipped))
            net.eval()
            assert all(torch.allclose(lin(xl), full_l) for _ in range(10))
    finally:
        for m in (lin, conv):
            m.restore()


def test_scale_weight_norms_bounds_every_modules_update_and_counts_the_scaled(tiny_unet_te):
    unet, te = tiny_unet_te
    net = LoRANetwork(unet, [te], dim=4, alpha=2, conv_dim=3)
    torch.manual_seed(0)
    for i, m in enumerate(net.loras):
        torch.nn.init.normal_(m.lora_up.weight, std=0.3 if i % 2 else 0.001)  # every other module far below the bound

    def updown(m) -> torch.Tensor:  # kohya's explicit product
        return (m.lora_up.weight.flatten(1) @ m.lora_down.weight.flatten(1)) * m.scale

    before = [updown(m).norm().item() for m in net.loras]
    untouched = {m.lora_name: m.lora_up.weight.clone() for m, b in zip(net.loras, before) if b <= 1.0}
    torch.testing.assert_close(torch.stack([m.updown_norm() for m in net.loras]), torch.tensor(before), rtol=1e-4, atol=1e-7)
    scaled, mean, largest = net.max_norm_(1.0)
    after = [updown(m).norm().item() for m in net.loras]
    assert int(scaled) == sum(b > 1.0 for b in before) and 0 < int(scaled) < len(net.loras)
    assert max(after) <= 1.0 + 1e-5 and float(largest) == pytest.approx(max(after), rel=1e-4)
    assert float(mean) == pytest.approx(sum(after) / len(after), rel=1e-4)
    assert all(a == pytest.approx(1.0, rel=1e-4) for a, b in zip(after, before) if b > 1.0)
    assert all(torch.equal(m.lora_up.weight, untouched[m.lora_name]) for m in net.loras if m.lora_name in untouched)
    kept = [m.lora_up.weight.clone() for m in net.loras]
    net.max_norm_(1.0)  # already bounded: at most a rounding's worth left to scale
    assert all(torch.allclose(m.lora_up.weight, k, rtol=1e-6, atol=0) for m, k in zip(net.loras, kept))


def test_loraplus_gives_lora_up_a_higher_rate(tiny_unet_te):
    unet, te = tiny_unet_te
    net = LoRANetwork(unet, [te], dim=4, alpha=4)
    groups = net.param_groups(1e-4, 5e-5, loraplus_ratio=16)
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3, 5e-5, 8e-4]
    up_ids = {id(m.lora_up.weight) for m in net.loras}
    assert all(id(p) in up_ids for p in groups[1]["params"]) and not any(id(p) in up_ids for p in groups[0]["params"])
    assert len(net.param_groups(1e-4, 5e-5)) == 2
    # kohya's per-part ratios: the UNet's and the text encoder's lora_up rates apart
    groups = net.param_groups(1e-4, 5e-5, loraplus_ratio=16, loraplus_te_ratio=4)
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3, 5e-5, 2e-4]
    groups = net.param_groups(1e-4, 5e-5, loraplus_te_ratio=4)  # the UNet without LoRA+
    assert [g["lr"] for g in groups] == [1e-4, 5e-5, 2e-4] and len(groups[0]["params"]) == 2 * net.n_unet


@pytest.mark.parametrize("name", ["adamw", "lion", "prodigy", "adafactor", "sgd"])
def test_each_optimizer_builds_and_steps(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = optimizers.make(name, [{"params": [w], "lr": 1.0 if name == "prodigy" else 1e-2}],
                          lr=1e-2, weight_decay=0.0)
    before = w.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert (w.detach() ** 2).sum() < (before ** 2).sum()  # every one of them descends


def test_8bit_optimizers_say_what_they_need():
    try:
        import bitsandbytes.optim  # noqa: F401
    except ImportError:
        with pytest.raises(optimizers.OptimizerError, match="bitsandbytes"):
            optimizers.make("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1e-3, weight_decay=0)
    else:
        pytest.skip("bitsandbytes is installed here")


def test_metadata_modes():
    md = {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_v2": "False", "ss_base_model_version": "sd_v1",
          "ss_network_module": "networks.lora", "ss_learning_rate": "0.0001", "ss_sd_model_name": "my-merge.safetensors",
          "ss_dataset_dirs": json.dumps({"10_ayaka 1girl": {"n_repeats": 10, "img_count": 3}}),
          "ss_tag_frequency": json.dumps({"10_ayaka 1girl": {"1girl": 3}}), "ss_training_comment": "private",
          "modelspec.architecture": "stable-diffusion-v1/lora"}
    assert metadata.apply_mode(md, "full") == md
    public = metadata.apply_mode(md, "public")
    assert "ayaka" not in json.dumps(public) and "my-merge" not in json.dumps(public)
    assert json.loads(public["ss_dataset_dirs"]) == {"dataset_1": {"n_repeats": 10, "img_count": 3}}
    assert json.loads(public["ss_tag_frequency"]) == {"dataset_1": {"1girl": 3}}
    assert public["ss_learning_rate"] == "0.0001"
    assert set(metadata.apply_mode(md, "minimal")) == {"ss_network_dim", "ss_network_alpha", "ss_v2",
                                                        "ss_base_model_version", "ss_network_module",
                                                        "modelspec.architecture"}


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_locon_lion_loraplus_from_existing_weights_end_to_end(demo):
    demo.shorten()
    lora = demo.root / "output/demo/demo.safetensors"
    start = demo.root / "projects/start.safetensors"
    start.write_bytes(lora.read_bytes())
    demo.edit(lambda d: (d["network"].update(conv_dim=4, conv_alpha=2, loraplus_lr_ratio=4, dropout=0.1,
                                             weights="start.safetensors"),
                         d["train"].update(optimizer="lion", learning_rate=0.0002, optimizer_args={"betas": [0.9, 0.99]}),
                         d["output"].update(metadata="public")))
    demo.doit("train:demo", build="options")
    weights = load_file(str(lora))
    conv = weights["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape
    assert conv[0] == 4 and tuple(conv[2:]) == (3, 3)
    md = _meta(lora)
    assert md["ss_optimizer"].startswith("lion_pytorch.lion_pytorch.Lion(")
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2", "loraplus_lr_ratio": "4"}
    assert md["ss_network_dropout"] == "0.1"
    assert "redcircle" not in md["ss_dataset_dirs"] and "ss_sd_model_name" not in md
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    # Changing the starting weights' bytes retrains; the same bytes under another mtime does not.
    demo.doit("train:demo", build="same")
    assert demo.ran("same") == set()
    tensors = load_file(str(start))
    tensors = {k: v * 0.5 if "lora_up" in k else v for k, v in tensors.items()}
    save_file(tensors, str(start))
    demo.doit("train:demo", build="newstart")
    assert demo.report("train", "demo")["computed"] == 1


def test_report_and_loss_plot(built_demo):
    out = built_demo.root / "output/demo"
    from PIL import Image

    png = Image.open(out / "loss.png")
    assert png.size[0] >= 600 and png.size[1] >= 300
    proc = built_demo.lorabuild("report", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["steps"] == 240 and rep["epochs"] == 6 and rep["saved_epochs"] == [2, 4, 6]
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert rep["mean_loss"] == pytest.approx(sum(losses) / len(losses))
    assert {f["path"] for f in rep["files"]} >= {"output/demo/demo.safetensors", "output/demo/loss.png"}
    text = built_demo.lorabuild("report", "demo").stdout
    assert "240 steps, 6 epochs" in text and "demo-000002.safetensors" in text


def test_multires_noise_is_seeded_unit_std_and_coarse():
    from lorabuild.train.losses import multires_noise

    base = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(0))
    a = multires_noise(base, 6, 0.8, torch.Generator().manual_seed(1))
    b = multires_noise(base, 6, 0.8, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == base.shape
    assert abs(float(a.std()) - 1.0) < 1e-4
    # low frequencies gained weight: neighbouring pixels now correlate
    corr = lambda x: float(torch.corrcoef(torch.stack([x[:, :, :-1].flatten(), x[:, :, 1:].flatten()]))[0, 1])  # noqa: E731
    assert corr(a) > corr(base) + 0.1
    assert torch.equal(multires_noise(base, 0, 0.3), base)


def test_debiased_weights_are_one_over_root_snr():
    from lorabuild.train.losses import debiased_weights

    alphas = torch.tensor([0.8, 0.5, 0.2])  # SNR 4, 1, 0.25
    w = debiased_weights(alphas, torch.tensor([0, 1, 2]), v_prediction=False)
    assert torch.allclose(w, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(debiased_weights(alphas, torch.tensor([0]), v_prediction=True), torch.tensor([0.2]))


def test_memory_and_noise_options_change_training_as_they_should(demo):
    demo.shorten()
    demo.doit("train:demo", build="short")
    out = demo.root / "output/demo/demo.safetensors"
    plain = load_file(str(out))
    demo.edit(lambda d: d["train"].update(gradient_checkpointing=True))
    demo.doit("train:demo", build="gc")
    assert demo.report("train")["computed"] == 1
    same = load_file(str(out))
    assert all(torch.equal(plain[k], same[k]) for k in plain)  # less memory, the same LoRA
    demo.edit(lambda d: d["train"].update(multires_noise_iterations=6, debiased_estimation=True))
    demo.doit("train:demo", build="noise")
    other = load_file(str(out))
    assert not all(torch.equal(plain[k], other[k]) for k in plain)
    md = _meta(out)
    assert md["ss_multires_noise_iterations"] == "6" and md["ss_debiased_estimation"] == "True"
    demo.edit(lambda d: d["train"].update(attention="xformers"))
    proc = demo.doit("train:demo", build="xformers", check=False)
    said = proc.stdout + proc.stderr
    # without the package the train stage refuses at its start; with it but no CUDA, the trainer says why
    assert proc.returncode != 0 and ("train.attention: xformers needs xformers, which is not installed" in said
                                     or "train.attention: xformers is not usable here" in said)


def test_keep_last_keeps_the_last_saved_epochs_only(demo):
    # epochs 6, saved every 2: assembled from the demo build's epochs without training
    demo.edit(lambda d: (d["train"].update(epochs=6), d["output"].update(keep_last=2)))
    demo.doit("train:demo", build="keep")
    assert sorted(p.name for p in (demo.root / "output/demo").glob("*.safetensors")) == [
        "demo-000004.safetensors", "demo.safetensors"]


def test_validation_split_holds_images_out_and_logs_their_loss(demo):
    demo.shorten()
    demo.edit(lambda d: d["train"].update(epochs=2, validation_split=0.25))
    plan = json.loads(demo.lorabuild("plan", "demo", "--json").stdout)
    held = [w for w in plan["warnings"] if "held out for validation" in w]
    assert held and held[0].startswith("4 image(s)")
    assert plan["steps"]["samples_per_epoch"] == 12
    demo.doit("train:demo", build="val")
    out = demo.root / "output/demo"
    rows = (out / "val_loss.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,val_loss" and [r.split(",")[:2] for r in rows[1:]] == [["1", "4"], ["2", "8"]]
    rep = json.loads(demo.lorabuild("report", "demo", "--json").stdout)
    assert rep["steps"] == 8 and len(rep["validation_loss"]) == 2
    assert rep["validation_loss"] == [float(r.split(",")[2]) for r in rows[1:]]
    # a run extended by one epoch measures the first two epochs the same way (fixed noise and timesteps)
    demo.edit(lambda d: d["train"].update(epochs=3))
    demo.doit("train:demo", build="val3")
    assert "continued" in " ".join(demo.report("train")["notes"])
    rows3 = (out / "val_loss.csv").read_text().splitlines()
    assert rows3[1:3] == rows[1:] and len(rows3) == 4


def _make_rgba(path, transparent_left: bool = True) -> None:
    """The image at ``path`` with an alpha channel: its left half fully transparent."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    if transparent_left:
        alpha.paste(0, (0, 0, rgba.size[0] // 2, rgba.size[1]))
    rgba.putalpha(alpha)
    rgba.save(path)


def test_masked_loss_masks_images_with_alpha_and_keeps_the_others_entries(demo):
    demo.shorten()
    folder = demo.data / "10_redcircle shape"
    alpha_images = sorted(folder.glob("*.png"))[:4]
    for p in alpha_images:
        _make_rgba(p)
    demo.doit("train:demo", build="rgba")
    assert demo.report("latents")["computed"] == 4  # new bytes; their working copies are flattened RGB
    lora = demo.root / "output/demo/demo.safetensors"
    plain = load_file(str(lora))
    before = {e["id"]: e["hash"] for e in demo.manifest("latents")["items"]}

    demo.edit(lambda d: d["train"].update(masked_loss=True))
    demo.doit("train:demo", build="masked")
    rep = demo.report("latents")
    assert (rep["computed"], rep["reused"]) == (4, 12)  # only the images with alpha get a mask (a new key)
    after = {e["id"]: e["hash"] for e in demo.manifest("latents")["items"]}
    ids = {p.relative_to(demo.root / "projects").as_posix() for p in alpha_images}
    assert {i for i in after if after[i] != before[i]} == ids
    entry = load_file(str(demo.root / "cache/objects/latents" / after[min(ids)][:2] / f"{after[min(ids)][2:]}.safetensors"))
    mask = entry["mask"]
    assert mask.shape == entry["latent"].shape[-2:]
    w = mask.shape[-1]
    assert mask[:, : w // 2 - 1].max() < 0.05 and mask[:, w // 2 + 1 :].min() > 0.95
    assert demo.report("train")["computed"] == 1
    masked = load_file(str(lora))
    assert not all(torch.equal(plain[k], masked[k]) for k in plain)

    demo.edit(lambda d: d["train"].update(masked_loss=False))
    demo.doit("train:demo", build="unmasked")
    rep = demo.report("latents")
    assert (rep["computed"], rep["reused"]) == (0, 16)
    assert demo.report("train")["reused"] == 1  # the unmasked LoRA trained before is restored
    again = load_file(str(lora))
    assert all(torch.equal(plain[k], again[k]) for k in plain)


def _val_image(src, dst) -> None:
    """A new validation image: a demo image mirrored (new bytes), with its caption."""
    from PIL import Image, ImageOps

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        ImageOps.mirror(im).save(dst)
    dst.with_suffix(".txt").write_text(src.with_suffix(".txt").read_text())


def test_val_dirs_are_measured_every_epoch_and_never_trained_on(demo):
    lora = demo.root / "output/demo/demo.safetensors"
    demo.shorten()
    demo.edit(lambda d: d["train"].update(epochs=2))
    demo.doit("train:demo", build="two")
    plain = load_file(str(lora))
    red = sorted((demo.data / "10_redcircle shape").glob("*.png"))
    for i in range(2):
        _val_image(red[i], demo.root / "projects/val" / f"v{i}.png")
    demo.edit(lambda d: d["dataset"].update(val_dirs=["val"]))
    plan = json.loads(demo.lorabuild("plan", "demo", "--json").stdout)
    assert plan["validation"] == {"images": 2, "held_out": 0, "val_images": 2}
    assert plan["steps"]["samples_per_epoch"] == 16 and plan["steps"]["total_steps"] == 10  # val images do not count
    assert "validation: 2 images" in demo.lorabuild("plan", "demo").stdout
    demo.doit("train:demo", build="val")
    assert demo.report("resize")["computed"] == 2 and demo.report("latents")["computed"] == 2
    rows = (demo.root / "output/demo/val_loss.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["1", "5"], ["2", "10"]]
    rep = json.loads(demo.lorabuild("report", "demo", "--json").stdout)
    assert rep["steps"] == 10 and len(rep["validation_loss"]) == 2
    # never trained on: the LoRA is the one trained without them, bit for bit
    with_val = load_file(str(lora))
    assert all(torch.equal(plain[k], with_val[k]) for k in plain)
    md = _meta(lora)
    assert "val" not in json.loads(md["ss_tag_frequency"]) and "val" not in json.loads(md["ss_dataset_dirs"])
    assert md["ss_num_train_images"] == "16"
    # another validation image: measured from the first epoch again (the rows are part of the run),
    # with the same weights; only the new image is cached
    _val_image(red[2], demo.root / "projects/val/v2.png")
    demo.doit("train:demo", build="val3")
    assert demo.report("latents")["computed"] == 1 and demo.report("train")["computed"] == 1
    rows3 = (demo.root / "output/demo/val_loss.csv").read_text().splitlines()
    assert len(rows3) == 3 and rows3 != rows
    again = load_file(str(lora))
    assert all(torch.equal(plain[k], again[k]) for k in plain)


def _small_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)


def test_fp8_base_stores_weights_in_float8_and_computes_like_their_rounded_fp32_copy():
    """train.base_precision fp8 (kohya fp8_base): Linear/conv weights held in float8_e4m3fn, norms not;
    the forward pass equals the fp32 model whose weights were rounded to fp8, with a LoRA on top too,
    and applying/removing the LoRA keeps the casting in place."""
    from lorabuild import precision

    unet, ref = _small_unet(), _small_unet()
    assert precision.store(unet, "fp8", torch.float32)
    assert unet.conv_in.weight.dtype == torch.float8_e4m3fn and unet.time_embedding.linear_1.weight.dtype == torch.float8_e4m3fn
    assert unet.conv_norm_out.weight.dtype == torch.float32 and unet.dtype == torch.float32  # what pipelines see
    with torch.no_grad():
        for (name, p), q in zip(unet.named_parameters(), ref.parameters()):
            q.copy_(p.float())  # fp8 → fp32 is exact: ref holds the rounded weights in fp32
    assert precision.stored_bytes(unet) < 0.3 * precision.stored_bytes(ref)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=h).sample
        torch.testing.assert_close(out, ref(x, t, encoder_hidden_states=h).sample, rtol=1e-5, atol=1e-6)
        assert unet.conv_in.weight.dtype == torch.float8_e4m3fn  # cast back after its forward
        nets = [LoRANetwork(m, [], dim=4, alpha=4, train_text_encoder=False) for m in (unet, ref)]
        for net in nets:
            for m in net.loras:
                torch.manual_seed(1)
                torch.nn.init.normal_(m.lora_up.weight, std=0.1)
                torch.nn.init.normal_(m.lora_down.weight, std=0.1)
            net.apply()
        a, b = (m(x, t, encoder_hidden_states=h).sample for m in (unet, ref))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, out)  # the LoRA acts on the fp8-stored model
        for net in nets:
            net.restore()
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=h).sample, out)  # restored: casting still on
    assert not precision.store(_small_unet(), "auto", torch.float32)
    assert not precision.store(_small_unet(), "bf16", torch.bfloat16)  # loaded in bf16 already: nothing to cast


def test_bucket_metadata_is_what_the_train_key_holds_and_a_change_rewrites_the_files_only(demo):
    """A bucket setting that moves no image (the latents stay) changes what the saved files
    state (ss_max_bucket_reso): they are written again from the training state, nothing trained."""
    demo.edit(lambda d: d["bucket"].update(max_reso=320))  # no bucket of area <= 128² is 320 wide at step 64
    proc = demo.doit("train:demo", build="max-reso")
    assert demo.report("latents")["computed"] == 0 and demo.report("latents")["reused"] > 0
    notes = " ".join(demo.report("train")["notes"])
    assert "wrote 1 saved file again" in notes and "LoRA modules" not in proc.stdout
    with safe_open(str(demo.root / "output/demo/demo.safetensors"), "pt") as fh:
        md = fh.metadata()
    assert md["ss_max_bucket_reso"] == "320" and md["ss_min_bucket_reso"] == "64"
    assert md["ss_resolution"] == "(128, 128)" and md["modelspec.resolution"] == "128x128"
