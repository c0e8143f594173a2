"""LyCORIS network types (network.type loha / lokr / dora / ia3 / full / diag-oft) trained through the CLI on the tiny
models: the file has the layout A1111/ComfyUI/Forge load, lorabuild's own reading of it agrees
with the lycoris-lora library and with what training applied, DoRA loads in diffusers, and a
killed run continues bit for bit."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import copy_workspace, init_workspace
from lora_check import unet_outputs
from test_resume import _kill_after_state, _notes, _same, _states

pytest.importorskip("lycoris")

from lorabuild import models
from lorabuild.lora import lyco  # noqa: E402
from lorabuild.lora.adapter import from_config  # noqa: E402

TYPES = ("loha", "lokr", "dora", "ia3", "full", "diag-oft")
# rank 2 (so LoKr factors its larger matrix and alpha/rank ≠ 1 everywhere), LoCon-style 3×3 convs too
NET = {"dim": 2, "alpha": 1.0, "conv_dim": 2, "conv_alpha": 1.0}
# the LoHa also trains with a scalar and both dropouts for two epochs: the resume test's fresh run
# full also trains the norm layers, diag-OFT with a cap and a rescale. LoHa (a scalar beside its
# factors) and full (the whole weights, applied in place) train two epochs for the resume test; IA3's
# and diag-OFT's training state is their parameters, as LoHa's
EXTRA = {"loha": {"use_scalar": True, "rank_dropout": 0.2, "module_dropout": 0.1}, "lokr": {"factor": 4}, "dora": {},
         "ia3": {"train_on_input": True, "module_dropout": 0.1},
         "full": {"train_norm": True, "rank_dropout": 0.1, "rank_dropout_scale": True},
         "diag-oft": {"constraint": 1e-3, "rescaled": True, "rank_dropout": 0.1}}
RESUMED = ("loha", "full")
SUFFIXES = {"loha": {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
            "dora": {"alpha", "lora_down.weight", "lora_up.weight", "dora_scale"}, "ia3": {"weight", "on_input"},
            "full": {"diff", "diff_b"}, "diag-oft": {"oft_blocks", "rescale", "alpha"}}
NORM = {"w_norm", "b_norm"}  # train_norm's modules, on the LayerNorm/GroupNorm layers
# LyCORIS' module class names, by layout
LIB_NAME = {"loha": "loha", "lokr": "kron", "dora": "locon", "ia3": "ia3", "full": "full", "diag-oft": "diag-oft"}
ARCH = {"tiny-sd1": ("sd1", 32, 0), "tiny-sdxl": ("sdxl", 72, 32)}  # arch, text width, pooled width


def _short(d: dict, model: str) -> None:
    """One concept, each image once, one epoch, no samples: a few steps."""
    d["base_model"] = f"builtin:{model}"
    d["dataset"] = {"concepts": [{"path": "demo/10_redcircle shape", "repeats": 1}]}
    d["train"].update(epochs=1, save_every_n_epochs=None, seed=3)
    d["network"].update(NET)
    d.pop("sample", None)


@pytest.fixture(scope="module", params=sorted(ARCH))
def trained(request, tmp_path_factory):
    """(workspace, model name, {type: its saved file}): one workspace per model with a project per
    type (demo is the LoHa), trained by one `doit train` (latents and embeddings made once, shared)."""
    model = request.param
    ws = init_workspace(tmp_path_factory.mktemp(model) / "ws")
    ws.edit(lambda d: _short(d, model))
    text = ws.yaml_path.read_text()
    for kind in TYPES:
        doc = yaml.safe_load(text)
        doc["network"].update(type=kind, **EXTRA[kind])
        doc["train"]["epochs"] = 2 if kind in RESUMED else 1
        (ws.root / "projects" / ("demo" if kind == "loha" else kind)).with_suffix(".yaml").write_text(
            yaml.safe_dump(doc, sort_keys=False))
    ws.doit("train", build=model)
    files = {}
    for kind in TYPES:
        name = "demo" if kind == "loha" else kind
        assert ws.report("train", project=name)["computed"] == 1
        files[kind] = ws.root / "output" / name / f"{name}.safetensors"
    return ws, model, files


def _modules(tensors: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for k, v in tensors.items():
        name, suffix = k.split(".", 1)
        out.setdefault(name, {})[suffix] = v
    return out


def _net_cfg(kind: str) -> dict:
    return {**NET, "train_unet": True, "train_text_encoder": False, "type": kind, **EXTRA.get(kind, {})}


@pytest.mark.parametrize("kind", TYPES)
def test_the_file_has_lycoris_layout_and_kohya_metadata(trained, kind):
    ws, model, files = trained
    with safe_open(str(files[kind]), "pt") as fh:
        md, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    assert md["ss_network_module"] == "lycoris.kohya"
    args = json.loads(md["ss_network_args"])
    assert args["algo"] == {"dora": "locon"}.get(kind, kind) and (args.get("dora_wd") == "True") == (kind == "dora")
    assert (args["conv_dim"], md["ss_network_dim"], md["ss_network_alpha"]) == ("2", "2", "1.0")
    assert {k: v for k, v in args.items() if k in EXTRA[kind] and "dropout" not in k} == {
        k: str(v) for k, v in EXTRA[kind].items() if "dropout" not in k}  # train_norm=True, constraint=0.001…
    mods = _modules(tensors)
    norms = {n for n, t in mods.items() if set(t) == NORM}
    assert bool(norms) == (kind == "full")
    # the module names are exactly those of lorabuild's kohya LoRA (SGM names on SDXL), and with
    # train_norm the target blocks' norms: LayerNorms of the transformers, GroupNorms of the ResNets
    unet = models.load_unet(ws.root / "cache/models" / model)
    lora_names = {m.lora_name for m in from_config(_net_cfg("lora"), unet, [], ARCH[model][0]).loras}
    assert set(mods) - norms == lora_names
    if model == "tiny-sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in mods
        assert not norms or {"lora_unet_input_blocks_4_1_transformer_blocks_0_norm1", "lora_unet_input_blocks_4_1_norm",
                             "lora_unet_input_blocks_4_0_in_layers_0"} <= norms
    elif norms:
        assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm3",
                "lora_unet_down_blocks_0_resnets_0_norm1"} <= norms
    from lycoris.modules import get_module

    for name, t in mods.items():
        if name in norms:
            assert get_module(tensors, name)[0].name == "norm"
            continue
        if kind == "lokr":  # each Kronecker side is a full matrix or a low-rank pair
            assert "alpha" in t and ("lokr_w1" in t) != ("lokr_w1_a" in t) and ("lokr_w2" in t) != ("lokr_w2_a" in t)
        elif kind == "full":  # diff_b where the layer has a bias
            assert {"diff"} <= set(t) <= SUFFIXES[kind], name
        else:
            assert set(t) == SUFFIXES[kind], name
        assert get_module(tensors, name)[0].name == LIB_NAME[kind]  # LyCORIS reads the layout as this algo
    if kind == "lokr":
        assert any("lokr_w2_a" in t for t in mods.values())  # rank 2 factors the larger side somewhere


def _library_delta(kind: str, t: dict, org) -> torch.Tensor:
    """ΔW (LoHa/LoKr) or the merged weight (the others) as lycoris-lora computes it from the saved tensors."""
    from lycoris.functional import loha, lokr
    from lycoris.modules import get_module, make_module

    t = {k: v.float() for k, v in t.items()}
    if kind == "loha":
        rank = t["hada_w1_b"].shape[0]
        d = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
                             gamma=float(t["alpha"]) / rank)
        return d.reshape(org.weight.shape)
    if kind == "lokr":
        g = [t.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")]
        # gamma is alpha here: LyCORIS divides by the rank of a factored side itself (none factored: 1)
        return lokr.diff_weight(*g, gamma=float(t["alpha"])).reshape(org.weight.shape)
    if kind == "ia3":  # LyCORIS 4.1.3's IA3Module.make_module_from_state_dict does not take its own on_input
        from lycoris.modules import IA3Module

        module = IA3Module("m", org, 1.0, train_on_input=bool(t["on_input"]))
        module.weight.data.copy_(t["weight"])
        return module.get_merged_weight(1.0, org.weight.shape)[0]
    sd = {f"m.{k}": v for k, v in t.items()}
    cls, params = get_module(sd, "m")
    return make_module(cls, params, "m", org).get_merged_weight(1.0, org.weight.shape)[0]


MERGED = ("dora", "ia3", "full", "diag-oft")  # _library_delta gives the merged weight


def _org(m):
    """The layer a module trains, with its own weight (full takes it while applied)."""
    import copy

    org = m.org_module[0]
    if "weight" not in dict(org.named_parameters()):
        org = copy.copy(org)
        org._parameters = {}
        org.weight, org.bias = m._org_params
    return org


@pytest.mark.parametrize("kind", TYPES)
def test_our_merge_agrees_with_the_library_and_with_training(trained, kind):
    ws, model, files = trained
    arch, width, pooled = ARCH[model]
    folder = ws.root / "cache/models" / model
    unet = models.load_unet(folder)
    net = from_config(_net_cfg(kind), unet, [], arch)
    mods = _modules(load_file(str(files[kind])))
    worst, changed = 0.0, 0
    for m in net.loras:
        org = m.org_module[0]
        ours = lyco.merged_weight(mods[m.lora_name], org.weight.detach())
        lib = _library_delta(_kind(kind, mods[m.lora_name]), mods[m.lora_name], org).detach()
        lib = lib if _kind(kind, mods[m.lora_name]) in MERGED else org.weight.detach() + lib
        worst = max(worst, float((ours - lib).abs().max()))
        changed += bool((ours - org.weight).abs().max() > 1e-6)
    assert worst < 1e-5 and changed > len(net.loras) // 2  # trained, and read alike
    # the whole UNet: the network as training and sampling apply it (lorabuild's modules, loaded from
    # the file) and the base UNet with lorabuild's merged weights give the same output
    ours, plain, _ = unet_outputs(folder, files[kind], arch, width, pooled=pooled, net_cfg=_net_cfg(kind),
                                  diffusers=False)
    merged = models.load_unet(folder)
    names = {m.lora_name: m.org_module[0] for m in from_config(_net_cfg(kind), merged, [], arch).loras}
    with torch.no_grad():
        for name, org in names.items():
            org.weight.copy_(lyco.merged_weight(mods[name], org.weight))
            if org.bias is not None:  # full's diff_b, a norm's b_norm
                org.bias.copy_(lyco.merged_bias(mods[name], org.bias))
    assert (ours - plain).abs().max() > 1e-4
    torch.testing.assert_close(_unet_out(merged, width, pooled), ours, atol=1e-4, rtol=1e-4)


def _kind(kind: str, t: dict) -> str:
    return "full" if set(t) == NORM else kind  # a norm module merges as the library's module does, like full


def _unet_out(unet, width: int, pooled: int):
    g = torch.Generator().manual_seed(1)  # lora_check.unet_outputs' inputs
    x, t, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, width, generator=g)
    added = {"text_embeds": torch.randn(2, pooled, generator=g),
             "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)} if pooled else None
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def test_diffusers_reads_doras_lora_part(trained):
    """diffusers (0.42) has no LoHa/LoKr loader for SD/SDXL, and its load_lora_weights drops a kohya
    DoRA's dora_scale (with a warning): what it loads must be exactly the LoRA part of the file."""
    ws, model, files = trained
    arch, width, pooled = ARCH[model]
    folder = ws.root / "cache/models" / model
    mods = _modules(load_file(str(files["dora"])))
    lora_part = models.load_unet(folder)
    names = {m.lora_name: m.org_module[0] for m in from_config(_net_cfg("dora"), lora_part, [], arch).loras}
    with torch.no_grad():
        for name, org in names.items():
            t = {k: v for k, v in mods[name].items() if k != "dora_scale"}
            org.weight.copy_(lyco.merged_weight(t, org.weight))
    pipe = models.load_pipeline(folder)
    pipe.load_lora_weights(str(files["dora"]))
    theirs, ours = _unet_out(pipe.unet, width, pooled), _unet_out(lora_part, width, pooled)
    assert (ours - _unet_out(models.load_unet(folder), width, pooled)).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("trained", ["tiny-sd1"], indirect=True)
def test_diffusers_refuses_ia3_full_and_oft_files(trained):
    """diffusers (0.42) has no loader for LyCORIS' IA3, full or diag-OFT layouts: it refuses the
    files (README says so) rather than loading part of them."""
    ws, model, files = trained
    pipe = models.load_pipeline(ws.root / "cache/models" / model)
    for kind in ("ia3", "full", "diag-oft"):
        with pytest.raises(ValueError, match="not been correctly renamed"):
            pipe.load_lora_weights(str(files[kind]), adapter_name=kind.replace("-", "_"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: process groups and SIGKILL")
@pytest.mark.parametrize("trained", ["tiny-sd1"], indirect=True)
@pytest.mark.parametrize("kind", RESUMED)
def test_a_killed_lycoris_run_with_its_options_and_dropouts_continues_bit_exact(trained, kind, tmp_path):
    """The training state holds LyCORIS' raw tensors (use_scalar's scalar apart from w1_a; full's
    whole weights, norms included) and the random draws of rank and module dropout: a killed run
    continues to the fresh run's bytes."""
    ws = copy_workspace(trained[0], tmp_path / "ws")
    if kind != "loha":  # the type's project (trained two epochs by the fixture) as the demo
        shutil.copy(ws.root / "projects" / f"{kind}.yaml", ws.root / "projects/demo.yaml")
    shutil.rmtree(ws.root / "cache/objects/train")  # no trained epochs or states: the run starts from step 0
    ws.doit("forget", "train:demo", build="forget")
    _kill_after_state(ws, 1)
    assert 2 not in _states(ws).values()
    ws.doit("train:demo", build="resume")
    assert "continued from the training state after epoch 1" in _notes(ws)
    resumed = load_file(str(ws.root / "output/demo/demo.safetensors"))
    assert {k.split(".", 1)[1] for k in resumed} == SUFFIXES[kind] | (NORM if kind == "full" else set())  # all there
    assert _same(resumed, load_file(str(trained[2][kind])))  # the fixture's uninterrupted run


@pytest.mark.parametrize("trained", ["tiny-sd1"], indirect=True)
def test_another_save_precision_writes_the_lycoris_files_again_without_training(trained, tmp_path):
    """The training state keeps LyCORIS' saved layout at full precision (LoHa's scalar folded in,
    full's difference from the base, as the file holds them): save_precision fp32 writes each
    type's file again from it, training nothing."""
    ws = copy_workspace(trained[0], tmp_path / "ws")
    for kind in TYPES:
        path = ws.root / "projects" / f"{_project(kind)}.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["output"]["save_precision"] = "fp32"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = ws.doit("train", build="fp32")
    assert "LoRA modules" not in proc.stdout
    for kind in TYPES:
        name = _project(kind)
        assert "wrote 1 saved file again from the full-precision weights" in " ".join(
            ws.report("train", project=name)["notes"]), kind
        fp32 = load_file(str(ws.root / "output" / name / f"{name}.safetensors"))
        assert all(v.dtype == torch.float32 for v in fp32.values())
        assert _same({k: v.half() for k, v in fp32.items()}, load_file(str(trained[2][kind]))), kind


def _project(kind: str) -> str:
    return "demo" if kind == "loha" else kind


def test_sd2_networks_read_alike_by_lorabuild_and_the_library(tmp_path):
    """SD 2 (no CLI run: the same code as SD 1 with other widths): each type's saved file, merged
    by lorabuild, equals LyCORIS' reading of it and the applied network."""
    from lycoris.modules import get_module

    unet = models.load_unet(models.ensure_builtin("tiny-sd2", tmp_path / "cache"))
    torch.manual_seed(0)
    for kind in TYPES:
        net = from_config(_net_cfg(kind), unet, [], "sd2")
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # a trained-looking network: no factor left at zero
        net.save(tmp_path / f"{kind}.safetensors", dtype=torch.float32)
        mods = _modules(load_file(str(tmp_path / f"{kind}.safetensors")))
        assert all(n.startswith("lora_unet_") for n in mods) and len(mods) == len(net.loras)
        net.apply()
        net.eval()
        for m in net.loras[::5]:
            org, t = _org(m), mods[m.lora_name]
            is_norm = set(t) == NORM
            assert get_module({f"{m.lora_name}.{k}": v for k, v in t.items()},
                              m.lora_name)[0].name == ("norm" if is_norm else LIB_NAME[kind])
            lib = _library_delta(_kind(kind, t), t, org)
            ours = lyco.merged_weight(t, org.weight.detach())
            torch.testing.assert_close(ours, lib if _kind(kind, t) in MERGED else org.weight.detach() + lib,
                                       atol=1e-5, rtol=1e-5)
            if is_norm:  # the UNet outputs of the tests above apply them
                continue
            x = torch.randn(2, org.weight.shape[1], *([4, 4] if org.weight.dim() == 4 else []))
            bias = lyco.merged_bias(t, org.bias)
            with torch.no_grad():  # what training and sampling apply: the module's forward
                want = F.conv2d(x, ours, bias, **m.kw_dict) if org.weight.dim() == 4 else F.linear(x, ours, bias)
                torch.testing.assert_close(m.org_module[0](x), want, atol=1e-5, rtol=1e-5)
        net.restore()
        restored = models.load_unet(models.ensure_builtin("tiny-sd2", tmp_path / "cache"))
        assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), restored.state_dict().values()))


def test_validate_names_options_that_do_not_fit_the_type(tmp_path, monkeypatch):
    import subprocess

    (tmp_path / "img").mkdir()
    head = "base_model: builtin:tiny-sd1\ndataset:\n  dirs: [img]\nnetwork:\n"
    for name, body in (("a", "  type: loha\n  factor: 4\n  dropout: 0.1\ntrain:\n  scale_weight_norms: 1\n"
                              "  base_precision: fp8\n"),
                       ("b", "  type: locon\n"), ("c", "  type: lokr\n  factor: 4\n  decompose_both: true\n"),
                       ("d", "  type: ia3\n  rank_dropout: 0.1\n  constraint: 0.5\n  train_norm: true\n"),
                       ("e", "  train_norm: true\n")):
        (tmp_path / f"{name}.yaml").write_text(head + body)
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "validate", "a.yaml", "b.yaml", "c.yaml", "d.yaml",
                           "e.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert "Traceback" not in proc.stderr
    assert [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln[1:7] == ".yaml:"] == [
        "a.yaml:6:11: network.factor: is set but network.type is loha (factor is for lokr)",
        "a.yaml:7:12: network.dropout: is not available for network.type loha (LyCORIS' loha has no such option)",
        "a.yaml:9:23: train.scale_weight_norms: is not available for network.type loha (kohya's max-norm is LoRA's)",
        "a.yaml:10:19: train.base_precision: fp8 is not available for network.type loha (use fp16 or bf16)",
        "b.yaml:5:9: network.type: locon needs network.conv_dim (LoCon is LoRA on the 3×3 convolutions too)",
        "d.yaml:6:17: network.rank_dropout: is not available for network.type ia3 (a scale per channel has no rank; "
        "module_dropout is)",
        "d.yaml:7:15: network.constraint: is set but network.type is ia3 (constraint is for diag-oft)",
        "e.yaml:5:15: network.train_norm: is set but network.type is lora (train_norm is for loha, lokr, dora, ia3, "
        "full, diag-oft)"]
    # without the package, validate (and the train stage) name it and how to install it
    from lorabuild import extras

    monkeypatch.setattr(extras, "installed", lambda module: module != "lycoris")
    assert extras.missing({"network": {"type": "dora"}}) == [
        'network.type: dora needs lycoris-lora, which is not installed: pip install -e ".[lycoris]" in a clone of '
        'lorabuild, or pip install "lorabuild[lycoris]"']
    assert extras.missing({"network": {"type": "locon"}}) == []


def test_import_kohya_maps_lycoris_algos(tmp_path):
    import subprocess

    from lorabuild.importers.convert import convert_full

    (tmp_path / "img").mkdir()
    (tmp_path / "dora.toml").write_text('pretrained_model_name_or_path = "builtin:tiny-sd1"\ntrain_data_dir = "img"\n'
                                        'network_dim = 8\nnetwork_alpha = 4\nnetwork_module = "lycoris.kohya"\n'
                                        'network_args = ["algo=lora", "dora_wd=True"]\n')
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "import-kohya", "dora.toml", "-o", "dora.yaml"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert yaml.safe_load((tmp_path / "dora.yaml").read_text())["network"] == {"dim": 8, "alpha": 4.0, "type": "dora"}
    assert "validated dora.yaml: no problems" in proc.stdout and "not mapped" not in proc.stderr
    base = {"network_dim": 8, "network_alpha": 4, "network_module": "lycoris.kohya"}
    r = convert_full({**base, "network_args": ["algo=lokr", "factor=8", "decompose_both=True", "use_tucker=True",
                                               "conv_dim=4", "loraplus_lr_ratio=4"]})
    assert r.doc["network"] == {"dim": 8, "alpha": 4.0, "type": "lokr", "factor": 8, "decompose_both": True,
                                "use_tucker": True, "conv_dim": 4}
    assert r.unmapped == ["network_args loraplus_lr_ratio=4 (LyCORIS' lokr does not use it)"]
    r = convert_full({**base, "network_args": ["algo=loha", "factor=-1", "decompose_both=False"]})
    assert r.doc["network"]["type"] == "loha" and not r.unmapped  # LyCORIS' defaults: off
    assert {"network_args factor", "network_args decompose_both"} <= set(r.off)
    r = convert_full({**base, "network_args": ["algo=glora", "conv_dim=4"]})
    assert "type" not in r.doc["network"] and [u.split(" (")[0] for u in r.unmapped] == [
        "network_args algo=glora", "network_args conv_dim=4"]
    # IA3, native fine-tuning and diag-OFT with their options, and train_norm for any LyCORIS algo
    r = convert_full({**base, "network_args": ["algo=ia3", "train_on_input=True", "train_norm=True", "constraint=0"]})
    assert r.doc["network"] == {"dim": 8, "alpha": 4.0, "type": "ia3", "train_on_input": True, "train_norm": True}
    assert not r.unmapped and "network_args constraint" in r.off
    r = convert_full({**base, "network_args": ["algo=diag-oft", "constraint=0.01", "rescaled=True", "rank_dropout=0.1"]})
    assert r.doc["network"] == {"dim": 8, "alpha": 4.0, "type": "diag-oft", "constraint": 0.01, "rescaled": True,
                                "rank_dropout": 0.1}
    r = convert_full({**base, "network_args": ["algo=full", "conv_dim=4", "rescaled=True"]})
    assert r.doc["network"] == {"dim": 8, "alpha": 4.0, "type": "full", "conv_dim": 4}
    assert r.unmapped == ["network_args rescaled=True (LyCORIS' full does not use it)"]
    # the kohya_ss GUI's LyCORIS types launch lycoris.kohya with algo=…: LoKr, and LoCon with dora_wd (DoRA)
    from lorabuild.importers.read import Source, from_gui

    gui = {"LoRA_type": "LyCORIS/LoKr", "network_dim": 8, "network_alpha": 4, "conv_dim": 4, "conv_alpha": 1,
           "factor": 8, "decompose_both": True, "use_cp": False, "train_norm": False}
    r = convert_full(from_gui(gui, Source("kohya_ss GUI", {})))
    assert r.doc["network"] == {"dim": 8, "alpha": 4.0, "type": "lokr", "conv_dim": 4, "conv_alpha": 1.0, "factor": 8,
                                "decompose_both": True, "use_tucker": False, "train_norm": False}
    gui = {"LoRA_type": "LyCORIS/Diag-OFT", "network_dim": 8, "network_alpha": 4, "constrain": 0.5, "rescaled": True,
           "train_norm": True, "factor": -1}
    assert convert_full(from_gui(gui, Source("kohya_ss GUI", {}))).doc["network"] == {
        "dim": 8, "alpha": 4.0, "type": "diag-oft", "constraint": 0.5, "rescaled": True, "train_norm": True}
    gui = {"LoRA_type": "LyCORIS/iA3", "network_dim": 8, "network_alpha": 4, "train_on_input": True}
    assert convert_full(from_gui(gui, Source("kohya_ss GUI", {}))).doc["network"]["type"] == "ia3"
    gui = {"LoRA_type": "LyCORIS/Native Fine-Tuning", "network_dim": 8, "network_alpha": 4}
    assert convert_full(from_gui(gui, Source("kohya_ss GUI", {}))).doc["network"]["type"] == "full"
    gui = {"LoRA_type": "LyCORIS/LoCon", "network_dim": 8, "network_alpha": 4, "conv_dim": 4, "dora_wd": True}
    assert convert_full(from_gui(gui, Source("kohya_ss GUI", {}))).doc["network"] == {
        "dim": 8, "alpha": 4.0, "type": "dora", "conv_dim": 4}


@pytest.mark.parametrize("trained", ["tiny-sdxl"], indirect=True)
def test_sdxl_text_encoders_train_lycoris_modules_too(trained, tmp_path):
    """With train_text_encoder, both SDXL text encoders get the type's modules under kohya's lora_te1_/lora_te2_
    names; the file loads back into a fresh network exactly."""
    folder = trained[0].root / "cache/models/tiny-sdxl"
    tes = [models.load_text_encoder(folder, which=p) for p in models.text_parts(folder)]
    unet = models.load_unet(folder)
    cfg = {**_net_cfg("lokr"), "train_text_encoder": True}
    net = from_config(cfg, unet, tes, "sdxl")
    assert net.module_count()[1] > 0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net.save(tmp_path / "te.safetensors", dtype=torch.float32)
    names = {k.split(".")[0] for k in load_file(str(tmp_path / "te.safetensors"))}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names
    again = from_config(cfg, models.load_unet(folder), [models.load_text_encoder(folder, which=p)
                                                         for p in models.text_parts(folder)], "sdxl")
    assert again.load_weights(tmp_path / "te.safetensors") == []
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict_kohya().values(), again.state_dict_kohya().values()))
