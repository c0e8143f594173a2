"""The CPU convolution path chosen per layer shape (lorabuild/cpuconv.py)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorabuild import cpuconv


def _forced(path: str, tmp_path, name: str) -> cpuconv.Chooser:
    """A chooser that already holds ``path`` for every key it will be asked (read from its file)."""
    ch = cpuconv.Chooser(tmp_path / name)
    ch.choose = lambda key, run: run(path)
    return ch


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(cpuconv, "MIN_FLOP", 0.0)


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("path", cpuconv.PATHS)
def test_both_paths_compute_the_native_convolution_and_its_gradients(path, tmp_path, small_threshold):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.Conv2d(16, 4, 1))
    x = torch.randn(2, 8, 12, 12)
    y0, gx0, gp0 = _grads(model, x)
    model.zero_grad(set_to_none=True)
    assert cpuconv.install(model, _forced(path, tmp_path, "c.json")) == 3
    y1, gx1, gp1 = _grads(model, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp1, gp0):  # weights and biases
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    cpuconv.uninstall(model)
    assert not any("_conv_forward" in m.__dict__ for m in model.modules())


def test_frozen_weights_get_no_gradient_and_the_input_one_is_right(tmp_path, small_threshold):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 6, 10, 10, requires_grad=True)
    ref = torch.autograd.grad(conv(x).square().sum(), x)[0]
    for path in cpuconv.PATHS:
        cpuconv.uninstall(conv)
        cpuconv.install(conv, _forced(path, tmp_path, "c.json"))
        y = conv(x)
        # the input is not among what the backward keeps (only the weight): it can be freed
        saved = [t for t in (y.grad_fn.saved_tensors if hasattr(y.grad_fn, "saved_tensors") else []) if t is not None]
        assert all(t.data_ptr() != x.data_ptr() for t in saved) and any(t is conv.weight for t in saved)
        got = torch.autograd.grad(y.square().sum(), x)[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert conv.weight.grad is None


def test_each_shape_is_timed_once_the_faster_path_kept_and_the_next_run_times_nothing(tmp_path, small_threshold):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    file = tmp_path / "tuning" / "cpu-conv.json"
    seen = []
    ch = cpuconv.Chooser(file)
    real = cpuconv._on_path

    def spy(path, fn):
        seen.append(path)
        return real(path, fn)
    cpuconv._on_path, saved = spy, cpuconv._on_path
    try:
        cpuconv.install(model, ch)
        x = torch.randn(1, 4, 9, 9, requires_grad=True)
        model(x).sum().backward()
        # shapes: conv 1, then conv 2 and 3 share one; forward and backward each: 4 keys, both paths each
        assert ch.timed == 4 and len(ch.choices) == 4
        assert seen.count("mkldnn") >= 4 and seen.count("thnn") >= 4
        doc = json.loads(file.read_text())
        assert doc["machine"] == cpuconv.machine_id() and doc["choices"] == ch.choices
        assert all(v in cpuconv.PATHS for v in doc["choices"].values())
        assert {k.split()[0] for k in doc["choices"]} == {"fwd", "bwd"}

        cpuconv.uninstall(model)
        again = cpuconv.Chooser(file)
        cpuconv.install(model, again)
        seen.clear()
        model(x).sum().backward()
        assert again.timed == 0  # every choice read from the file
        assert len(seen) == 6  # 3 forwards + 3 backwards, each on its one recorded path
        assert sorted(set(seen)) == sorted(set(ch.choices.values()))
    finally:
        cpuconv._on_path = saved


def test_the_faster_path_is_the_one_chosen(tmp_path, small_threshold):
    ticks = iter([0.0, 1.0, 1.0, 6.0])  # timed after a warm-up call: thnn takes 1 s, mkldnn 5 s
    ch = cpuconv.Chooser(None, clock=lambda: next(ticks))
    assert ch.choose("k", lambda p: p) == "thnn" and ch.choices == {"k": "thnn"}
    ticks = iter([0.0, 9.0, 9.0, 10.0])
    ch = cpuconv.Chooser(None, clock=lambda: next(ticks))
    assert ch.choose("k", lambda p: p) == "mkldnn"


def test_another_machines_choices_are_not_used(tmp_path):
    file = tmp_path / "cpu-conv.json"
    file.write_text(json.dumps({"machine": "some other CPU | torch 0 | 64 threads", "choices": {"fwd k": "thnn"}}))
    assert cpuconv.Chooser(file).choices == {}
    file.write_text("{not json")
    assert cpuconv.Chooser(file).choices == {}


def test_small_convolutions_autocast_and_other_dtypes_keep_pytorchs_path(tmp_path):
    model = nn.Conv2d(4, 4, 3, padding=1)
    ch = cpuconv.Chooser(tmp_path / "c.json")
    cpuconv.install(model, ch)
    model(torch.randn(1, 4, 8, 8)).sum().backward()  # 2·4·4·9·64 flop: far under MIN_FLOP
    assert ch.choices == {} and not (tmp_path / "c.json").exists()
    cpuconv.MIN_FLOP, saved = 0.0, cpuconv.MIN_FLOP
    try:
        model.double()(torch.randn(1, 4, 8, 8, dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.float()(torch.randn(1, 4, 8, 8))
        assert ch.choices == {}
        with torch.no_grad():  # inference (sampling) is routed too, forward only
            model(torch.randn(1, 4, 8, 8))
        assert list(ch.choices) and all(k.startswith("fwd ") for k in ch.choices)
    finally:
        cpuconv.MIN_FLOP = saved


def test_the_choices_are_the_machines_and_a_process_started_meanwhile_adopts_them(tmp_path, monkeypatch,
                                                                                   small_threshold):
    monkeypatch.setenv("LORABUILD_TUNING_DIR", str(tmp_path / "tuning"))
    file = cpuconv.choices_file()
    assert file.parent == tmp_path / "tuning" and file.name.startswith("cpu-conv-")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(1, 4, 10, 10, requires_grad=True)
    # two processes (two workspaces, or two ranks) start together: both read the file before either wrote
    first, second = cpuconv.Chooser(file), cpuconv.Chooser(file)
    cpuconv.install(model, first)
    model(x).sum().backward()
    assert first.timed == 4  # 2 shapes, forward and backward
    cpuconv.uninstall(model)
    cpuconv.install(model, second)
    model(x).sum().backward()
    assert second.timed == 0 and second.choices == first.choices  # read again before timing: the same paths
    assert json.loads(file.read_text())["choices"] == first.choices


def test_the_tuning_folder_is_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LORABUILD_TUNING_DIR", raising=False)
    monkeypatch.setattr(cpuconv.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpuconv.tuning_dir() == tmp_path / "xdg" / "lorabuild" / "tuning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpuconv.tuning_dir() == tmp_path / "home" / ".cache" / "lorabuild" / "tuning"
    monkeypatch.setattr(cpuconv.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cpuconv.tuning_dir() == tmp_path / "local" / "lorabuild" / "tuning"


def test_only_the_cpu_is_routed_and_native_can_be_asked_for(monkeypatch):
    assert cpuconv.enabled(torch.device("cpu")) and not cpuconv.enabled(torch.device("cuda"))
    monkeypatch.setenv("LORABUILD_CPU_CONV", "native")
    assert not cpuconv.enabled(torch.device("cpu"))


def test_a_real_build_records_its_choices_once_and_trains_what_pytorchs_own_path_trains(demo, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    demo.shorten()
    demo.edit(lambda d: d["train"].update(epochs=1, save_every_n_epochs=None))
    monkeypatch.setenv("LORABUILD_CPU_CONV_MIN_FLOP", "0")  # route the tiny model's convolutions too
    monkeypatch.setenv("LORABUILD_TUNING_DIR", str(demo.root.parent / "tuning"))  # not the suite's shared file
    file = cpuconv.choices_file()
    demo.doit("train:demo", build="chosen")
    assert not (demo.root / "cache/tuning").exists()  # the machine's, not the workspace's
    doc = json.loads(file.read_text())
    assert doc["machine"] == cpuconv.machine_id()
    assert any(k.startswith("fwd ") for k in doc["choices"]) and any(k.startswith("bwd ") for k in doc["choices"])
    chosen = load_file(str(demo.root / "output/demo/demo.safetensors"))

    shutil.rmtree(demo.root / "cache/objects/train")  # the same run again, on PyTorch's own path
    monkeypatch.setenv("LORABUILD_CPU_CONV", "native")
    demo.doit("train:demo", build="native")
    native = load_file(str(demo.root / "output/demo/demo.safetensors"))
    assert chosen.keys() == native.keys()
    for k in native:  # the same training, to float32 rounding (fp16 files)
        torch.testing.assert_close(chosen[k].float(), native[k].float(), rtol=1e-2, atol=1e-3)
    assert json.loads(file.read_text()) == doc  # untouched by the native run


def test_release_frozen_lets_the_cache_stages_vae_go(monkeypatch):
    import gc
    import weakref

    from lorabuild.stages import runtime

    class VAE(nn.Module):
        pass

    monkeypatch.setattr(runtime.models, "load_vae", lambda folder, device: VAE())
    runtime._load.cache_clear()
    ref = weakref.ref(runtime._load("vae", "some/folder", "cpu"))
    gc.collect()
    assert ref() is not None and runtime._load.cache_info().currsize == 1  # held by the cache
    runtime.release_frozen()
    assert ref() is None and runtime._load.cache_info().currsize == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_through_the_chosen_path(reentrant, tmp_path, small_threshold):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
    lora = nn.Conv2d(8, 8, 1)  # a trained part after the frozen block, as a LoRA is
    block.requires_grad_(False)
    x = torch.randn(1, 8, 10, 10, requires_grad=True)

    def grads():  # .backward(): reentrant checkpointing refuses autograd.grad
        x.grad = lora.weight.grad = None
        lora(checkpoint(block, x, use_reentrant=reentrant)).square().sum().backward()
        return x.grad.clone(), lora.weight.grad.clone()
    ref = grads()
    for path in cpuconv.PATHS:
        cpuconv.uninstall(block)
        cpuconv.install(block, _forced(path, tmp_path, "c.json"))
        got = grads()
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
