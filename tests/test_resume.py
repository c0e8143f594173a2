"""Resumable, extendable training: states saved every epoch, runs continued bit for bit."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from conftest import init_workspace


def _weights(path) -> dict:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def _notes(ws) -> str:
    return " ".join(ws.report("train")["notes"])


def _fresh_run(ws, build: str) -> dict:
    """Train the current configuration from scratch (no cached epochs or states) and return its LoRA."""
    shutil.rmtree(ws.root / "cache/objects/train")
    ws.doit("forget", "train:demo", build=f"{build}-forget")
    ws.doit("train:demo", build=build)
    assert "continued" not in _notes(ws) and ws.report("train")["computed"] == 1
    return _weights(ws.root / "output/demo/demo.safetensors")


# The demo workspaces hold the 6-epoch demo run's states (epochs 2, 4, 6), which a run with
# the demo's settings would continue from; tests of continuing use their own seed.

def test_raising_epochs_continues_the_last_run_and_equals_a_fresh_one(demo):
    demo.shorten()
    demo.edit(lambda d: d["train"].update(epochs=1, seed=43))
    demo.doit("train:demo", build="one")
    assert "continued" not in _notes(demo)
    demo.edit(lambda d: d["train"].update(epochs=2))
    demo.doit("train:demo", build="extend")
    assert "continued from the training state after epoch 1 (step 5)" in _notes(demo)
    loss = (demo.root / "output/demo/loss.csv").read_text().splitlines()
    assert len(loss) == 1 + 10 and loss[-1].startswith("10,2,")  # the log carries on from the first run
    # TensorBoard: the continued run logs into the first one's folder, one point per step, as loss.csv has them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for run_dir in (demo.root / "output/demo/tensorboard").iterdir():
        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        if "loss/step" in acc.Tags()["scalars"]:
            logged[run_dir.name] = [(e.step, e.value) for e in acc.Scalars("loss/step")]
    csv_points = [(int(r.split(",")[0]), float(r.split(",")[2])) for r in loss[1:]]
    matching = [pts for pts in logged.values() if [st for st, _ in pts] == list(range(1, 11))]
    assert len(matching) == 1
    assert all(abs(v - c) < 1e-5 for (_, v), (_, c) in zip(matching[0], csv_points))
    continued = _weights(demo.root / "output/demo/demo.safetensors")
    assert _same(continued, _fresh_run(demo, "fresh"))


def test_lowering_epochs_assembles_saved_epochs_without_training(demo, built_demo):
    # The workspace holds the 6-epoch demo run's epochs 2, 4, 6 and their training states.
    demo.edit(lambda d: d["train"].update(epochs=4))
    demo.doit("train:demo", build="lower")
    assert "assembled from epochs trained before (up to epoch 4)" in _notes(demo)
    assert "train: " not in demo.doit("train:demo", build="noop").stdout
    out = demo.root / "output/demo"
    assert _same(_weights(out / "demo.safetensors"), _weights(built_demo.root / "output/demo/demo-000004.safetensors"))
    assert _same(_weights(out / "demo-000002.safetensors"),
                 _weights(built_demo.root / "output/demo/demo-000002.safetensors"))


def test_a_length_dependent_schedule_trains_from_the_start_and_says_why(demo):
    demo.edit(lambda d: d["train"].update(epochs=2, lr_scheduler="cosine"))
    demo.doit("train:demo", build="cosine")
    assert "trained from the start: the cosine schedule depends on the run's length" in _notes(demo)


def _states(ws) -> dict:
    """{training state file: its epoch} for the states in the store now."""
    out = {}
    for pt in (ws.root / "cache/objects/train").glob("*/*.pt"):
        try:
            out[pt] = json.loads(pt.with_suffix(".json").read_text())["info"]["epoch"]
        except (OSError, ValueError, KeyError):
            pass  # being written
    return out


def _kill_after_state(ws, epoch: int, timeout: float = 300) -> None:
    """Start ``doit train:demo`` and kill it once it has saved a new training state for ``epoch``."""
    before = set(_states(ws))
    env = {**os.environ, "LORABUILD_BUILD": "killed"}
    proc = subprocess.Popen([sys.executable, "-m", "doit", "train:demo"], cwd=ws.root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while epoch not in {e for pt, e in _states(ws).items() if pt not in before}:
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.time() < deadline, f"no training state for epoch {epoch} appeared"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: process groups and SIGKILL")
def test_a_killed_run_continues_from_its_last_state_and_ends_equal(demo):
    demo.shorten()
    demo.edit(lambda d: d["train"].update(epochs=4, seed=44))
    before = set(_states(demo))  # the demo build's own states (seed 42) are in the store too
    _kill_after_state(demo, 2)
    assert 4 not in {e for pt, e in _states(demo).items() if pt not in before}  # killed before its end
    demo.doit("train:demo", build="resume")
    assert "continued from the training state after epoch" in _notes(demo)
    resumed = _weights(demo.root / "output/demo/demo.safetensors")
    assert _same(resumed, _fresh_run(demo, "fresh"))


def _killed_short_run(tmp_path, train: dict, network: dict | None = None):
    """A fresh workspace whose demo sees its 16 images once per epoch (a few steps an epoch),
    with these train/network settings, killed after the state of epoch 1 and then continued."""
    ws = init_workspace(tmp_path / "ws")
    ws.shorten()

    def short(d):
        d["train"].update(**train)
        d["network"].update(**(network or {}))
        d.pop("sample", None)

    ws.edit(short)
    _kill_after_state(ws, 1, timeout=600)
    assert 3 not in _states(ws).values()
    ws.doit("train:demo", build="resume")
    assert "continued from the training state after epoch" in _notes(ws)
    return ws


KNOBS_TRAIN = {"min_timestep": 100, "max_timestep": 900, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True,
               "noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01,
               "scale_weight_norms": 0.05}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: process groups and SIGKILL")
def test_a_killed_run_with_kohyas_noise_dropout_and_max_norm_options_continues_bit_exact(tmp_path):
    """All the randomness these options add (rank and module dropout, noise strengths, input
    perturbation) and the in-place max-norm scaling survive a kill: the continued run equals a fresh one."""
    ws = _killed_short_run(tmp_path, {"epochs": 3, "seed": 45, "save_every_n_epochs": None, **KNOBS_TRAIN},
                           {"rank_dropout": 0.2, "module_dropout": 0.1})
    resumed = _weights(ws.root / "output/demo/demo.safetensors")
    rows = (ws.root / "output/demo/loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,seconds,keys_scaled,average_key_norm,max_key_norm"
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, len(rows))] and rows[-1].split(",")[1] == "3"
    assert all(float(r.split(",")[7]) <= 0.05 * (1 + 1e-5) for r in rows[1:])  # every module's norm bounded
    assert any(int(r.split(",")[5]) > 0 for r in rows[1:])  # and some modules were scaled to get there
    md = json.loads(subprocess.run([sys.executable, "-c", "import json,sys; from safetensors import safe_open; "
                                    "print(json.dumps(safe_open(sys.argv[1], 'pt').metadata()))",
                                    str(ws.root / "output/demo/demo.safetensors")], capture_output=True, text=True).stdout)
    assert md["ss_scale_weight_norms"] == "0.05" and md["ss_min_timestep"] == "100"
    assert json.loads(md["ss_network_args"])["rank_dropout"] == "0.2"
    assert _same(resumed, _fresh_run(ws, "fresh"))


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_output_settings_write_the_saved_files_again_from_the_states_without_training(demo):
    """save_precision, output.metadata and output.comment shape the saved files, never the weights:
    a change writes each saved file again from the full-precision weights in the cache (the
    training states, a snapshot's own weights), trains nothing, and re-renders only the samples
    whose LoRA's tensors changed."""
    import torch

    out = demo.root / "output/demo"
    demo.edit(lambda d: d["train"].update(save_every_n_steps=20))  # a step save: a snapshot with its own file
    demo.doit("sample:demo", build="steps")
    assert "continued" not in _notes(demo) and ws_loss(demo) and (out / "demo-step00000020.safetensors").is_file()
    files = ("demo.safetensors", "demo-step00000020.safetensors")
    fp16, md16, loss = {f: _weights(out / f) for f in files}, _metadata(out / "demo.safetensors"), ws_loss(demo)

    demo.edit(lambda d: d["output"].update(save_precision="fp32"))
    proc = demo.doit("sample:demo", build="fp32")
    assert "wrote 2 saved files again from the full-precision weights" in _notes(demo)
    assert "LoRA modules" not in proc.stdout and ws_loss(demo) == loss  # nothing trained
    fp32 = {f: _weights(out / f) for f in files}
    for f in files:  # the full-precision weights, which round to exactly the fp16 file's
        assert all(v.dtype == torch.float32 for v in fp32[f].values())
        assert _same({k: v.half() for k, v in fp32[f].items()}, fp16[f])
    md32 = _metadata(out / "demo.safetensors")
    assert md32["ss_session_id"] == md16["ss_session_id"]  # the metadata of the run that trained it
    assert md32["ss_training_finished_at"] == md16["ss_training_finished_at"]
    sample = demo.report("sample")
    assert (sample["computed"], sample["reused"]) == (2, 2)  # the LoRA's row again (2 prompts), not the base's

    demo.edit(lambda d: d["output"].update(save_precision="bf16"))
    demo.doit("sample:demo", build="bf16")
    assert "wrote 2 saved files again" in _notes(demo) and ws_loss(demo) == loss
    for f in files:
        assert _same(_weights(out / f), {k: v.to(torch.bfloat16) for k, v in fp32[f].items()})

    bf16 = {f: _weights(out / f) for f in files}
    demo.edit(lambda d: d["output"].update(comment="re-exported", metadata="public"))
    proc = demo.doit("sample:demo", build="comment")
    assert "wrote 2 saved files again" in _notes(demo) and "LoRA modules" not in proc.stdout
    assert all(_same(_weights(out / f), bf16[f]) for f in files)
    md = _metadata(out / "demo.safetensors")
    assert "ss_training_comment" not in md and "ss_sd_model_name" not in md and "ss_sd_model_name" in md16  # public
    assert (demo.report("sample")["computed"], demo.report("sample")["reused"]) == (0, 4)  # same tensors: no image
    demo.edit(lambda d: d["output"].update(metadata="full"))
    demo.doit("sample:demo", build="comment2")
    assert _metadata(out / "demo.safetensors")["ss_training_comment"] == "re-exported"


def ws_loss(ws) -> str:
    return (ws.root / "output/demo/loss.csv").read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: process groups and SIGKILL")
def test_a_killed_run_with_ema_continues_its_average_bit_exact(tmp_path):
    """train.ema's shadow weights and update count are part of the training state: after a kill
    the continued run's EMA files (every saved epoch) equal a fresh run's."""
    # 5 steps an epoch; averaging starts after step 3, every 2nd step
    ws = _killed_short_run(tmp_path, {"epochs": 3, "seed": 46, "save_every_n_epochs": 1,
                                      "ema": {"decay": 0.8, "update_after_step": 3, "every_n_steps": 2}})
    out = ws.root / "output/demo"
    names = ("demo-ema.safetensors", "demo-ema-000001.safetensors", "demo-ema-000002.safetensors")
    resumed = {n: _weights(out / n) for n in names}
    raw = _weights(out / "demo.safetensors")
    assert not _same(resumed["demo-ema.safetensors"], raw)
    assert _same(raw, _fresh_run(ws, "fresh"))
    assert all(_same(resumed[n], _weights(out / n)) for n in names)
