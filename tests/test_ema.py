"""train.ema: the moving average of the adapter, its files, grid rows, publishing and key."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import init_workspace
from lorabuild.config import without_newer
from lorabuild.train.ema import AdapterEMA, decay_at
from lorabuild.stages.train import NEWER_OFF


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)


def test_the_average_follows_the_warm_up_rule_after_update_after_step_every_n_steps():
    net = Tiny()
    ema = AdapterEMA(net, [net.a], decay=0.5, update_after_step=2, every_n_steps=2)
    assert set(ema.shadow) == {"a"}  # only the trained tensors
    expected, k = torch.zeros(3), 0
    for step in range(1, 9):
        with torch.no_grad():
            net.a.fill_(float(step))
        ema.update(step)
        if step <= 2:
            expected = net.a.detach().clone()  # before averaging starts: the weights themselves
        elif (step - 2) % 2 == 0:
            k += 1
            d = min(0.5, (1 + k) / (10 + k))
            expected = d * expected + (1 - d) * net.a.detach()
        assert torch.allclose(ema.shadow["a"], expected), step
    assert k == 3 and ema.updates == 3
    assert decay_at(0.999, 1) == 2 / 11 and decay_at(0.9, 1000) == 0.9


def test_applied_swaps_the_average_in_and_puts_the_weights_back_bit_for_bit():
    net = Tiny()
    with torch.no_grad():
        net.a.copy_(torch.tensor([0.1, 0.2, 0.3]))
    ema = AdapterEMA(net, [net.a], decay=0.9)
    before = net.a.detach().clone()
    with torch.no_grad():
        ema.shadow["a"].fill_(7.0)
    with ema.applied():
        assert torch.equal(net.a.detach(), torch.full((3,), 7.0))
    assert torch.equal(net.a.detach(), before)
    other = AdapterEMA(net, [net.a], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["a"], ema.shadow["a"]) and other.updates == ema.updates


def test_without_ema_the_train_key_is_what_it_was():
    section = {"learning_rate": 1e-4, "ema": None}
    assert without_newer(section, NEWER_OFF) == {"learning_rate": 1e-4}


def _short(ws, **ema):
    folders = sorted(p.name for p in ws.data.iterdir() if p.is_dir())

    def edit(d):  # 16 images seen once an epoch: 5 steps an epoch, 10 in all
        d["dataset"] = {"concepts": [{"path": f"demo/{f}", "repeats": 1} for f in folders]}
        d["train"].update(epochs=2, seed=45, save_every_n_epochs=1, ema=ema)
        d["sample"].update(prompts=d["sample"]["prompts"][:1], steps=2)

    ws.edit(edit)


def _tensors(path) -> dict:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_files_rows_save_choice_and_key_through_the_cli(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    _short(ws, decay=0.9)
    ws.doit("sample:demo", build="ema")
    out = ws.root / "output/demo"
    assert {p.name for p in out.glob("*.safetensors")} == {
        "demo.safetensors", "demo-000001.safetensors", "demo-ema.safetensors", "demo-ema-000001.safetensors"}
    raw, avg = _tensors(out / "demo.safetensors"), _tensors(out / "demo-ema.safetensors")
    assert raw.keys() == avg.keys() and all(raw[k].dtype == avg[k].dtype == torch.float16 for k in raw)
    ups = [k for k in raw if k.endswith("lora_up.weight")]
    assert all(torch.equal(raw[k], avg[k]) for k in raw if k.endswith(".alpha"))  # constants are not averaged
    assert any(not torch.equal(raw[k], avg[k]) for k in ups)
    # the average lags the weights, which start from lora_up = 0: smaller updates overall
    assert sum(float(avg[k].float().norm()) for k in ups) < sum(float(raw[k].float().norm()) for k in ups)
    md_raw = safe_open(str(out / "demo.safetensors"), "pt").metadata()
    md = safe_open(str(out / "demo-ema.safetensors"), "pt").metadata()
    assert md["ss_ema_decay"] == "0.9" and md["ss_ema_every_n_steps"] == "1" and "ss_ema_decay" not in md_raw
    assert set(md) - set(md_raw) == {"ss_ema", "ss_ema_decay", "ss_ema_update_after_step", "ss_ema_every_n_steps",
                                     "ss_ema_warmup"}
    assert md["ss_network_dim"] == md_raw["ss_network_dim"] and md["ss_epoch"] == md_raw["ss_epoch"] == "2"
    # the sample grid: base, then each epoch's raw row and its EMA row
    ids = [it["id"].split("-00-")[0] for it in ws.manifest("sample")["items"]]
    assert ids == ["base", "e000001", "e000001-ema", "e000002", "e000002-ema"]
    page = (out / "samples/index.html").read_text(encoding="utf-8")
    assert "epoch 1 EMA" in page and "epoch 2 EMA" in page
    # the train key holds the averaging settings, not what is published
    entry = ws.manifest("train")["items"][0]
    key = json.loads((ws.root / "cache/objects/train" / entry["hash"][:2] / f"{entry['hash'][2:]}.json").read_text())
    assert key["key"]["params"]["train"]["ema"] == {"decay": 0.9, "update_after_step": 0, "every_n_steps": 1}
    ema_file = _tensors(out / "demo-ema.safetensors")

    # another save precision: the EMA files are written again from the averaged weights the
    # training states keep (metadata and all), training nothing
    ws.edit(lambda d: d["output"].update(save_precision="fp32"))
    proc = ws.doit("train:demo", build="ema-fp32")
    assert "wrote 4 saved files again from the full-precision weights" in " ".join(ws.report("train")["notes"])
    assert "LoRA modules" not in proc.stdout
    ema32 = _tensors(out / "demo-ema.safetensors")
    assert all(v.dtype == torch.float32 for v in ema32.values())
    assert _same({k: v.half() for k, v in ema32.items()}, ema_file)
    md32 = safe_open(str(out / "demo-ema.safetensors"), "pt").metadata()
    assert md32["ss_ema_decay"] == "0.9" and md32["ss_session_id"] == md["ss_session_id"]
    ws.edit(lambda d: d["output"].update(save_precision="fp16"))

    # save: ema publishes the averaged weights under the usual names; nothing is trained again
    _short(ws, decay=0.9, save="ema")
    ws.doit("sample:demo", build="ema-only")
    assert ws.report("train")["computed"] == 0 and ws.report("sample")["computed"] == 0
    assert {p.name for p in out.glob("*.safetensors")} == {"demo.safetensors", "demo-000001.safetensors"}
    assert _same(_tensors(out / "demo.safetensors"), ema_file)
    assert [it["id"].split("-00-")[0] for it in ws.manifest("sample")["items"]] == ["base", "e000001-ema", "e000002-ema"]

    # averaging that has not started by the last step leaves the average equal to the weights
    _short(ws, decay=0.9, update_after_step=10)
    ws.doit("train:demo", build="late")
    assert ws.report("train")["computed"] == 1
    assert _same(_tensors(out / "demo-ema.safetensors"), _tensors(out / "demo.safetensors"))
    assert _same(_tensors(out / "demo-ema-000001.safetensors"), _tensors(out / "demo-000001.safetensors"))
