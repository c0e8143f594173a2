"""Windows behaviours simulated on Linux (tests/winsim.py): outputs held open by a UI, no symlink
privilege. Each drives the real doit CLI on a copy of the built demo."""
from __future__ import annotations

import hashlib
import json
import re

import winsim
from conftest import init_workspace


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store_file(ws, stage: str, h: str, ext: str):
    return ws.root / "cache" / "objects" / stage / h[:2] / f"{h[2:]}{ext}"


def test_retrain_while_the_lora_is_held_open_writes_beside_it_and_publishes_next_build(demo):
    out = demo.root / "output" / "demo"
    lora, side = out / "demo.safetensors", out / "demo.new.safetensors"
    before = _sha(lora)
    demo.edit(lambda d: d["train"].update(learning_rate=0.003))  # a different LoRA
    proc = winsim.doit(demo.root, "sample:demo", build="held", held=[lora])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"{lora} is open in another program" in proc.stderr and str(side) in proc.stderr
    assert "close the LoRA in the UI" in proc.stderr
    entry = demo.manifest("train")["items"][0]
    new = _store_file(demo, "train", entry["hash"], ".safetensors")
    assert _sha(lora) == before  # the held file was left alone
    assert _sha(side) == _sha(new) != before  # the new LoRA beside it, and in the cache
    assert demo.report("train")["computed"] == 1
    # the sample stage rendered the new LoRA (the cache's copy), not the held file's old bytes
    rows = {r["id"] for r in demo.manifest("sample")["items"]}
    assert rows and demo.ran("held") == {"train", "sample"}

    status = demo.lorabuild("status", "demo")
    assert "waits to replace a file that was open in another program" in status.stdout, status.stdout

    proc = winsim.doit(demo.root, "sample:demo", build="released")  # the UI let go
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _sha(lora) == _sha(new) and not side.exists()
    report = demo.report("train")
    assert (report["computed"], report["reused"]) == (0, 1)  # published from the cache, not retrained
    assert demo.ran("released") == {"train", "sample"} and demo.report("sample")["computed"] == 0
    assert winsim.doit(demo.root, "sample:demo", build="idle").returncode == 0
    assert demo.ran("idle") == set()


def test_unchanged_output_is_not_rewritten_even_when_held_open(demo):
    out = demo.root / "output" / "demo"
    lora = out / "demo.safetensors"
    st = lora.stat()
    demo.doit("forget", "train:demo", build="forget")
    proc = winsim.doit(demo.root, "sample:demo", build="again", held=[lora, out / "samples" / "grid.png"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train" in demo.ran("again") and "is open in another program" not in proc.stderr
    assert (lora.stat().st_ino, lora.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not list(out.glob("*.new.*"))


def test_pruning_keeps_a_held_epoch_file_with_a_warning(built_demo, tmp_path):
    from conftest import copy_workspace

    ws = copy_workspace(built_demo, tmp_path / "ws")
    out = ws.root / "output" / "demo"
    held = out / "demo-000002.safetensors"
    assert held.is_file() and (out / "demo-000004.safetensors").is_file()
    ws.edit(lambda d: d.setdefault("output", {}).update(keep_last=1))
    proc = winsim.doit(ws.root, "train:demo", build="prune", held=[held])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{held} is open in another program" in proc.stderr and "was not deleted" in proc.stderr
    assert held.is_file() and not (out / "demo-000004.safetensors").exists()
    assert ws.report("train")["reused"] == 1


def test_held_sample_images_and_grid(demo):
    samples = demo.root / "output" / "demo" / "samples"
    grid = samples / "grid.png"
    old_png = sorted(p for p in samples.glob("*.png") if p.name != "grid.png")[0]
    grid_before = _sha(grid)

    def add_prompt(d):
        d["sample"]["prompts"].append("redcircle, shape, black background")
    demo.edit(add_prompt)
    demo.edit(lambda d: d["sample"]["prompts"].pop(0))  # old_png's prompt goes: its file is pruned
    proc = winsim.doit(demo.root, "sample:demo", build="held", held=[grid, old_png])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{old_png} is open in another program" in proc.stderr and f"{grid} is open" in proc.stderr
    assert old_png.is_file() and _sha(grid) == grid_before
    assert (samples / "grid.new.png").is_file()
    proc = winsim.doit(demo.root, "sample:demo", build="released")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (samples / "grid.new.png").exists() and _sha(grid) != grid_before and not old_png.exists()
    assert demo.report("sample")["computed"] == 0
    assert json.loads((demo.root / "cache" / "reports" / "demo" / "sample.json").read_text())["build"] == "released"


def _weights(folder):
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file())


def test_vae_and_prediction_type_overrides_need_no_symlink_and_copy_no_weights(tmp_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import save_file

    from ldm_layout import vae_to_ldm
    from lorabuild import models

    cache = tmp_path / "cache"
    folder = models.ensure_builtin("tiny-sd1", cache)
    vae_sd = models.load_vae(folder).state_dict()
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    ldm = {k.removeprefix("first_stage_model."): v * 1.01 for k, v in vae_to_ldm(vae_sd, cfg).items()}
    save_file(ldm, str(tmp_path / "better-vae.safetensors"))

    winsim.install(no_symlink=True, monkeypatch=monkeypatch)
    copied = []
    real_copyfile = shutil.copyfile

    def copyfile(src, dst, *a, **kw):
        copied.append(str(src))
        return real_copyfile(src, dst, *a, **kw)
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    out = models.resolve_base_model("builtin:tiny-sd1", tmp_path, cache, {"vae": "better-vae.safetensors"})
    vpred = models.resolve_base_model("builtin:tiny-sd1", tmp_path, cache, {"prediction_type": "v_prediction"})
    assert not any(c.endswith((".safetensors", ".bin")) for c in copied), copied
    for composed in (out, vpred):
        assert not any(p.is_symlink() for p in composed.iterdir())
        shared = [p for p in _weights(composed) if p.relative_to(composed).parts[0] != "vae" or composed == vpred]
        assert shared and all(p.stat().st_nlink > 1 for p in shared)
        for p in shared:
            assert (folder / p.relative_to(composed)).samefile(p)
    got = models.load_vae(out).state_dict()
    assert all(torch.allclose(got[k], vae_sd[k] * 1.01) for k in vae_sd)
    sched = json.loads((vpred / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


def test_folder_install_waits_out_a_scanner_holding_a_new_file(tmp_path, monkeypatch):
    import os
    import time

    import pytest

    from lorabuild import models

    real_replace = os.replace
    refusals = []

    def replace(src, dst, *a, **kw):  # Defender holds a file in the new folder for 4 attempts
        if ".tmp-" in os.fspath(src) and os.path.isdir(src) and len(refusals) < 4:
            refusals.append(src)
            raise PermissionError(13, "Access is denied", os.fspath(src))
        return real_replace(src, dst, *a, **kw)
    waits = []
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(time, "sleep", waits.append)
    folder = models.ensure_builtin("tiny-sd1", tmp_path / "cache")
    assert (folder / "model_index.json").is_file() and len(refusals) == 4 and len(waits) == 4
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]

    refusals.clear()
    monkeypatch.setattr(os, "replace", lambda src, dst, *a, **kw: (_ for _ in ()).throw(
        PermissionError(13, "Access is denied", os.fspath(src))) if os.path.isdir(src) else real_replace(src, dst))
    with pytest.raises(models.ModelError, match=r"could not install the built-in model builtin:tiny-sd1 at .*"
                                                r"antivirus scan.*run the build again"):
        models.ensure_builtin("tiny-sd1", tmp_path / "cache2")
    assert sum(waits[4:]) < 20  # gives up after about 15 s of back-off


def test_watch_stops_on_windows_without_sigint_and_without_an_event(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import threading

    from lorabuild.commands import watch

    class WindowsPopen:  # what Popen.send_signal accepts on Windows
        def __init__(self):
            self.signals = []

        def poll(self):
            return None

        def send_signal(self, sig):
            if sig == signal.SIGINT:
                raise ValueError(f"Unsupported signal: {sig}")
            self.signals.append(sig)

    monkeypatch.setattr(sys, "platform", "win32")
    w = watch.Watcher(tmp_path, "demo")
    w.proc = WindowsPopen()
    w.request_stop()  # Ctrl-C during a build: no ValueError, doit got the console's Ctrl-C itself
    assert w.stop.is_set() and w.proc.signals == []

    # idle: the stop flag alone (as a Ctrl-C handler that only runs between waits sets it) ends the loop
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "demo.yaml").write_text("base_model: builtin:tiny-sd1\ndataset: {dirs: [d]}\n")
    w = watch.Watcher(tmp_path, "demo")
    monkeypatch.setattr(w, "_valid_yaml", lambda: False)  # nothing to build
    waits = []
    real_wait = w.wake.wait

    def wait(timeout=None):
        waits.append(timeout)
        if len(waits) == 3:
            w.stop.set()  # not wake: an untimed wait would never return
        return real_wait(timeout=timeout)
    monkeypatch.setattr(w.wake, "wait", wait)
    done = threading.Thread(target=w.run, daemon=True)
    done.start()
    done.join(timeout=60)
    assert not done.is_alive() and len(waits) == 3 and all(t is not None and t <= watch.POLL for t in waits)

    # a build: the wait for doit is timed too
    calls = []

    class Proc:
        def wait(self, timeout=None):
            calls.append(timeout)
            if len(calls) < 3:
                raise subprocess.TimeoutExpired("doit", timeout)
            return 0
    monkeypatch.setattr(watch.subprocess, "Popen", lambda *a, **kw: Proc())
    assert w.build() == 0 and calls == [watch.POLL] * 3


def test_lean_cpu_memory_is_a_printed_no_op_on_windows(monkeypatch, capsys):
    import ctypes
    import sys

    import torch

    from lorabuild.train.loop import LeanHeap

    def cdll(name, *a, **kw):  # CPython's ctypes on Windows: '/' in None
        raise TypeError("argument of type 'NoneType' is not iterable")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    heap = LeanHeap(True, torch.device("cpu"))
    heap.forward(), heap.backward(), heap.done()
    assert heap.libc is None and "lean_cpu_memory has no effect here" in capsys.readouterr().out


def test_compile_pre_check_accepts_msvc_on_windows(monkeypatch):
    import shutil
    import sys

    import pytest
    import torch

    from lorabuild.train import loop as trainer

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(torch, "compile", lambda m: ("compiled", m))
    monkeypatch.setattr(shutil, "which", lambda c: r"C:\VS\bin\cl.exe" if c == "cl" else None)
    assert trainer._compiled({"compile": True}, "unet", torch.device("cpu")) == ("compiled", "unet")
    monkeypatch.setattr(shutil, "which", lambda c: "/usr/bin/g++" if c == "g++" else None)  # no cl: refused, naming it
    with pytest.raises(trainer.TrainError, match=r"C\+\+ compiler \(cl\).*Visual Studio"):
        trainer._compiled({"compile": True}, "unet", torch.device("cpu"))


def test_several_processes_are_refused_on_windows_with_a_clear_message(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    import pytest

    from lorabuild import cli
    from lorabuild.train import dist

    root = tmp_path / "ws"
    assert cli.main(["init", str(root)]) == 0
    monkeypatch.chdir(root)
    for var in dist.ENV.values():
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    started = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: started.append(a))
    monkeypatch.setattr(sys, "platform", "win32")
    capsys.readouterr()
    assert cli.main(["train", "demo", "--nproc", "2"]) == 1
    err = capsys.readouterr().err
    assert "lorabuild train: 2 processes" in err and "cannot run on Windows" in err and "train.processes: 1" in err
    assert started == []  # neither doit nor torchrun was started
    with pytest.raises(dist.LaunchError, match="cannot run on Windows"):
        dist.run_ranks("latents", root / "cache", root, root / "projects" / "demo.yaml", dist.Launch(nproc=2))
    dist.check_launch(dist.Launch(nproc=1))  # one process is fine


def test_output_cannot_crash_a_cp1252_console(tmp_path):
    import os
    import subprocess
    import sys

    root = tmp_path / "ws"
    init_workspace(root)
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}  # what a redirected stdout gets on Windows
    listing = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=root, env=env, capture_output=True)
    assert listing.returncode == 0, listing.stderr.decode("cp1252")
    text = listing.stdout.decode("cp1252")
    assert "images ? RGB working copies" in text and "longest side ? resize.max_side" in text
    plan = subprocess.run([sys.executable, "-m", "lorabuild", "plan", "demo"], cwd=root, env=env, capture_output=True)
    assert plan.returncode == 0 and b"Traceback" not in plan.stderr, plan.stderr.decode("cp1252")


def test_a_workspace_path_long_enough_to_cross_max_path_is_warned_about(tmp_path, monkeypatch, capsys):
    import sys

    from lorabuild import tasks, winenv

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(winenv, "long_paths_enabled", lambda: False)
    deep = tmp_path / ("OneDrive - Contoso Ltd" + "/Documents and Settings" * 4) / "my LoRA training workspace"
    deep.mkdir(parents=True)
    assert len(str(deep)) + 1 + winenv.LONGEST_BELOW_ROOT >= winenv.MAX_PATH
    tasks.doit_config(deep)
    err = capsys.readouterr().err
    assert f"the workspace path {deep} is {len(str(deep))} characters long" in err and "LongPathsEnabled" in err
    tasks.doit_config(tmp_path)
    assert "characters long" not in capsys.readouterr().err
    monkeypatch.setattr(winenv, "long_paths_enabled", lambda: True)
    assert winenv.long_root_warning(deep) is None


def _validate(root, *files):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lorabuild", "validate", *files], cwd=root, capture_output=True, text=True)


def test_output_names_windows_cannot_create_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    good = "base_model: builtin:tiny-sd1\ndataset: {dirs: [data]}\n"
    for name, why in [("con", "device name Windows reserves"), ("NUL", "device name Windows reserves"),
                      ("aux.v2", "device name Windows reserves"), ("com1", "device name Windows reserves"),
                      ("Lpt9.lora", "device name Windows reserves"), ("demo.", "does not match")]:
        (tmp_path / "p.yaml").write_text(good + f"output: {{name: '{name}'}}\n")
        proc = _validate(tmp_path, "p.yaml")
        assert proc.returncode == 1 and f"p.yaml:3:16: output.name: '{name}'" in proc.stderr, (name, proc.stderr)
        assert why in proc.stderr, proc.stderr
    for name in ("console", "nullify", "com10", "demo.v2", "my_lora-1"):  # fine on Windows
        (tmp_path / "p.yaml").write_text(good + f"output: {{name: '{name}'}}\n")
        assert _validate(tmp_path, "p.yaml").returncode == 0, name


def test_output_names_differing_only_in_case_are_refused(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "ws"
    init_workspace(root)
    text = (root / "projects" / "demo.yaml").read_text()
    assert "\noutput:\n" in text  # the demo has an output section: name the other project's output in it
    (root / "projects" / "other.yaml").write_text(text.replace("\noutput:\n", "\noutput:\n  name: Demo\n", 1))
    proc = _validate(root, "projects/demo.yaml", "projects/other.yaml")
    assert proc.returncode == 1 and "write the same output folder on Windows" in proc.stderr, proc.stderr
    assert "projects/other.yaml (output Demo)" in proc.stderr and "projects/demo.yaml (output demo)" in proc.stderr
    listing = subprocess.run([sys.executable, "-m", "doit", "train:other"], cwd=root, capture_output=True, text=True)
    assert listing.returncode != 0 and "write the same output folder on Windows" in listing.stdout + listing.stderr
    assert "Traceback" not in listing.stderr and not (root / "output").exists()


def test_the_suite_collects_as_on_windows_and_posix_only_tests_skip():
    """Collected under winsim.pretend_windows (sys.platform "win32", no resource/fcntl module)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-p", "winsim", "-q", "-p", "no:cacheprovider", *a],  # noqa: E731
                                    cwd=tests.parent, env=env, capture_output=True, text=True)
    collected = run("--collect-only", "tests")
    assert collected.returncode == 0 and "ERROR" not in collected.stdout, collected.stdout[-3000:]
    assert " tests collected" in collected.stdout
    posix = run("-rs", "tests/test_faults.py", "tests/test_resume.py", "tests/test_speed_options.py", "tests/test_watch.py",
                "-k", "killed or full_disk or compiler or watch_builds")
    assert posix.returncode == 0 and " skipped" in posix.stdout, posix.stdout[-3000:]
    assert not re.search(r"\d+ (passed|failed|error)", posix.stdout), posix.stdout[-3000:]  # every POSIX-only test skipped
