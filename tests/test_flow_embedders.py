"""kohya's LoRAs on a flow model's input embedders: ``network.in_dims`` (FLUX.1, sd-scripts
networks/lora_flux.py: img_in, time_in, vector_in, guidance_in, txt_in) and ``network.emb_dims`` (SD 3.5,
networks/lora_sd3.py: context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear).
The file holds BFL's / SAI's names at each entry's rank and network.alpha; the PEFT file
(output.format: diffusers) loads into diffusers' load_lora_weights with every key placed and gives our
output; diffusers' kohya-FLUX converter reads the embedders' keys but its loader leaves them out (the
test pins that). The options reach the key and ss_network_args, and import-kohya maps them."""
import logging

import pytest
import torch
from safetensors.torch import load_file
from test_flux import _inputs as flux_inputs
from test_flux import _tiny_width_converter

from lorabuild import models
from lorabuild.families import family
from lorabuild.lora.adapter import from_config
from lorabuild.lora.flow_select import problems
from lorabuild.lora.metadata import network_args
from lorabuild.lora.network import NetworkConfigError, write_kohya

NET = {"dim": 4, "alpha": 2.0, "train_unet": True, "train_text_encoder": False}
FLUX_IN = {"lora_unet_img_in": (3, 64), "lora_unet_time_in_in_layer": (2, 256), "lora_unet_time_in_out_layer": (2, 32),
           "lora_unet_vector_in_in_layer": (1, 32), "lora_unet_vector_in_out_layer": (1, 32),
           "lora_unet_txt_in": (5, 32)}  # (rank, in) for in_dims [3, 2, 1, 0, 5]; img_in takes 2×2-packed latents


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name → the built-in tiny model's folder, each made once for the module."""
    root = tmp_path_factory.mktemp("emb")
    return lambda name: models.ensure_builtin(name, root)


def _net(folder, arch, **net):
    unet = models.load_unet(folder)
    network = from_config({**NET, **net}, unet, [], arch)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    return network.eval(), unet


def _predict(fam, transformer, inputs):
    with torch.no_grad():
        return fam.predict(transformer, *inputs)


def test_flux_in_dims_in_bfl_names_peft_loads_whole_and_diffusers_kohya_reader_drops_the_embedders(tiny, monkeypatch,
                                                                                             tmp_path, caplog):
    fam, flux = family("flux"), tiny("tiny-flux")
    net, unet = _net(flux, "flux", in_dims=[3, 2, 1, 0, 5])
    names = [m.lora_name for m in net.loras]
    embedders = [n for n in names if not n.startswith(("lora_unet_transformer_blocks", "lora_unet_single"))]
    assert len(embedders) == 6 and names[-6:] == embedders  # after the blocks', as kohya creates them
    path = tmp_path / "in_dims.safetensors"
    net.save(path, dtype=torch.float32)
    t = load_file(str(path))
    saved = {k.split(".")[0] for k in t if not k.startswith(("lora_unet_double", "lora_unet_single"))}
    assert saved == set(FLUX_IN)  # guidance_in's 0: no module
    for name, (rank, width_in) in FLUX_IN.items():
        assert t[f"{name}.lora_down.weight"].shape == (rank, width_in)
        assert t[f"{name}.lora_up.weight"].shape[1] == rank and float(t[f"{name}.alpha"]) == 2.0
    inputs = flux_inputs(unet)
    net.apply()
    ours = _predict(fam, unet, inputs)
    net.set_multiplier(0.0)
    plain = _predict(fam, unet, inputs)
    net.restore()
    assert (ours - plain).abs().max() > 1e-4
    # the embedders alone change the output too (their LoRAs are live, not only written)
    blocks_only, unet2 = _net(flux, "flux")
    blocks_only.apply()
    assert (_predict(fam, unet2, inputs) - ours).abs().max() > 1e-4
    convert = _tiny_width_converter(monkeypatch, 32)
    with caplog.at_level(logging.WARNING):
        converted = convert(load_file(str(path)))
    assert "Unsupported keys" not in caplog.text
    # diffusers' converter (0.42.1) reads every embedder key, but names them without the "transformer."
    # its block keys have, so load_lora_weights (which keeps "transformer."-prefixed keys) leaves them out:
    # the kohya file in diffusers gives our output with the embedders' LoRAs off. If this changes, the
    # README's in_dims note changes with it.
    embedder_paths = ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
                      "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                      "time_text_embed.text_embedder.linear_2")
    assert {k.rsplit(".lora_", 1)[0] for k in converted if not k.startswith("transformer.")} == set(embedder_paths)
    pipe = models.load_pipeline(flux)
    pipe.load_lora_weights(str(path))
    mods = {m.lora_name: m for m in net.loras}
    net.set_multiplier(1.0)
    net.apply()
    for name in embedders:
        mods[name].multiplier = 0.0
    without = _predict(fam, unet, inputs)
    net.restore()
    net.set_multiplier(1.0)
    torch.testing.assert_close(_predict(fam, pipe.transformer, inputs), without, atol=1e-5, rtol=1e-4)
    # output.format: diffusers: PEFT names, every key placed, the same output
    peft = tmp_path / "peft.safetensors"
    write_kohya(fam.peft_layout(net.state_dict_kohya(), net.denoiser_config), peft, torch.float32)
    written = load_file(str(peft))
    assert "transformer.time_text_embed.timestep_embedder.linear_1.lora_A.weight" in written
    pipe = models.load_pipeline(flux)
    pipe.load_lora_weights(str(peft))
    placed = {n for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert len(placed) == len({k for k in written if ".lora_A." in k})
    torch.testing.assert_close(_predict(fam, pipe.transformer, inputs), ours, atol=1e-5, rtol=1e-4)
    # both files read back into the network (resume, re-export, sampling)
    for f in (path, peft):
        again, _ = _net(flux, "flux", in_dims=[3, 2, 1, 0, 5])
        again.load_weights(f)
        for a, b in zip(again.loras, net.loras):
            torch.testing.assert_close(a.lora_up.weight @ a.lora_down.weight * a.scale,
                                       b.lora_up.weight @ b.lora_down.weight * b.scale, atol=1e-6, rtol=1e-5)


def test_sd3_emb_dims_saved_in_sai_names_and_peft_loads_with_our_output(tiny, tmp_path):
    from test_sd3_lora import _inputs

    fam, sd3 = family("sd3"), tiny("tiny-sd3")
    net, unet = _net(sd3, "sd3", emb_dims=[2, 3, 4, 1, 2, 5])
    path = tmp_path / "emb.safetensors"
    net.save(path, dtype=torch.float32)
    t = load_file(str(path))
    extra = {k.split(".")[0] for k in t if not k.startswith("lora_unet_joint_blocks")}
    assert extra == {"lora_unet_context_embedder", "lora_unet_t_embedder_mlp_0", "lora_unet_t_embedder_mlp_2",
                     "lora_unet_x_embedder_proj", "lora_unet_y_embedder_mlp_0", "lora_unet_y_embedder_mlp_2",
                     "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear"}
    assert t["lora_unet_x_embedder_proj.lora_down.weight"].shape == (4, 16, 2, 2)  # the patch conv: kohya's conv LoRA
    assert t["lora_unet_x_embedder_proj.lora_up.weight"].shape == (32, 4, 1, 1)
    assert t["lora_unet_final_layer_linear.lora_down.weight"].shape[0] == 5
    # SAI's final adaLN gives (shift, scale), diffusers' (scale, shift): the up's halves swapped in the file
    mod = {m.lora_name: m for m in net.loras}["lora_unet_norm_out_linear"]
    up = mod.lora_up.weight.detach()
    assert torch.equal(t["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"],
                       torch.cat(up.chunk(2)[::-1]))
    inputs = _inputs()
    net.apply()
    ours = _predict(fam, unet, inputs)
    net.restore()
    assert (ours - _predict(fam, unet, inputs)).abs().max() > 1e-4
    again, _ = _net(sd3, "sd3", emb_dims=[2, 3, 4, 1, 2, 5])
    again.load_weights(path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    peft = tmp_path / "peft.safetensors"
    write_kohya(fam.peft_layout(net.state_dict_kohya(), net.denoiser_config), peft, torch.float32)
    written = load_file(str(peft))
    assert "transformer.pos_embed.proj.lora_A.weight" in written and "transformer.norm_out.linear.lora_B.weight" in written
    pipe = models.load_pipeline(sd3)
    pipe.load_lora_weights(str(peft))
    placed = {n for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert len(placed) == len({k for k in written if ".lora_A." in k})
    torch.testing.assert_close(_predict(fam, pipe.transformer, inputs), ours, atol=1e-5, rtol=1e-4)


def test_embedder_dims_are_checked_keyed_only_when_set_and_written_as_kohya_reads_them(tiny, tmp_path):
    from lorabuild.lora.blocks import keyed

    assert "in_dims" not in keyed({"dim": 4, "in_dims": None}) and "emb_dims" not in keyed({"dim": 4})
    assert keyed({"dim": 4, "in_dims": [4, 0, 0, 0, 4]})["in_dims"] == [4, 0, 0, 0, 4]
    assert problems({"in_dims": [4, 0, 0, 0, 4]}, "flux") == []
    assert problems({"in_dims": [4, 0, 0, 0, 4]}, "sd3") == [("in_dims", "is for FLUX.1; this model is not")]
    assert problems({"emb_dims": [1, 1]}, "sd3") == [("emb_dims", "takes 6 dims, one per entry in kohya's order "
                                                     "(context_embedder, t_embedder, x_embedder, y_embedder, final_mod, "
                                                     "final_linear; 0: not trained)")]
    assert [f for f, _ in problems({"in_dims": [4, -1, 0, 0, 4]}, "flux")] == ["in_dims"]
    assert network_args({"in_dims": [4, 0, 0, 0, 4]})["in_dims"] == "[4,0,0,0,4]"
    assert network_args({"emb_dims": [0, 0, 2, 0, 0, 0]})["emb_dims"] == "[0,0,2,0,0,0]"
    assert "in_dims" not in network_args({"in_dims": None})
    # schnell has no guidance embedder: its entry, when set, is named
    folder = tiny("tiny-flux-schnell")
    with pytest.raises(NetworkConfigError, match=r"network.in_dims: entry 4 \(guidance_in\) is 2, but this transformer "
                                                 r"has no time_text_embed.guidance_embedder.linear_1"):
        from_config({**NET, "in_dims": [0, 0, 0, 2, 0]}, models.load_unet(folder), [], "flux")
    # validate names a wrong entry by its field, through the real CLI
    import subprocess
    import sys

    import yaml

    project = tmp_path / "p.yaml"
    (tmp_path / "data").mkdir()

    def validate(net: dict):
        project.write_text(yaml.safe_dump({"base_model": "builtin:tiny-flux", "dataset": {"dirs": ["data"]},
                                           "network": net}))
        return subprocess.run([sys.executable, "-m", "lorabuild", "validate", str(project)], capture_output=True,
                              text=True)

    assert validate({"in_dims": [4, 0, 0, 4, 0]}).returncode == 0
    for net, said in (({"in_dims": [4, 0, 0, 4]}, "network.in_dims: [4, 0, 0, 4] is too short"),
                      ({"emb_dims": [1, 1, 1, 1, 1, 1]}, "network.emb_dims: is for SD 3.5; this model is not")):
        proc = validate(net)
        assert proc.returncode != 0 and said in proc.stdout + proc.stderr
