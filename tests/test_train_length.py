"""Run length and saving by steps: max_steps (kohya max_train_steps), save_every_n_steps."""
from __future__ import annotations

import shutil

from safetensors.torch import load_file


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def _notes(ws) -> str:
    return " ".join(ws.report("train")["notes"])


def _loss_rows(ws) -> list[str]:
    return (ws.root / "output/demo/loss.csv").read_text().splitlines()[1:]


def test_max_steps_cuts_the_last_epoch_short_and_a_longer_run_never_takes_it_for_a_whole_one(demo):
    # the shortened demo trains 5 steps per epoch; 6 steps = epoch 1 and 1 step of epoch 2
    demo.shorten()
    demo.edit(lambda d: d["train"].update(max_steps=6, seed=44, save_every_n_epochs=1))
    demo.doit("train:demo", build="fifty")
    rows = _loss_rows(demo)
    assert len(rows) == 6 and rows[-1].startswith("6,2,")
    item = demo.manifest("train")["items"][0]
    assert [e[0] for e in item["epochs"]] == [1, 2] and item["epochs"][-1][2] == 6
    assert sorted(p.name for p in (demo.root / "output/demo").glob("demo*.safetensors")) == [
        "demo-000001.safetensors", "demo.safetensors"]
    plan = demo.lorabuild("plan", "demo")
    assert "epoch 2 stops after 1 of its steps" in plan.stdout, plan.stdout

    # 10 steps: continues from the whole epoch 1, not from the partial epoch 2
    demo.edit(lambda d: d["train"].update(max_steps=10))
    demo.doit("train:demo", build="eighty")
    assert "continued from the training state after epoch 1 (step 5)" in _notes(demo)
    rows = _loss_rows(demo)
    assert len(rows) == 10 and rows[-1].startswith("10,2,")
    continued = load_file(str(demo.root / "output/demo/demo.safetensors"))

    # the same 10 steps trained from nothing, as plain epochs
    shutil.rmtree(demo.root / "cache/objects/train")
    demo.edit(lambda d: d["train"].update(max_steps=None, epochs=2))
    demo.doit("train:demo", build="fresh")
    assert demo.report("train")["computed"] == 1 and "continued" not in _notes(demo)
    assert _same(continued, load_file(str(demo.root / "output/demo/demo.safetensors")))


def test_save_every_n_steps_writes_kohya_step_files_equal_to_a_run_stopped_there(demo):
    demo.shorten()  # 5 steps per epoch
    demo.edit(lambda d: d["train"].update(epochs=2, seed=45, save_every_n_epochs=None, save_every_n_steps=3))
    demo.doit("train:demo", build="steps")
    out = demo.root / "output/demo"
    assert sorted(p.name for p in out.glob("demo*.safetensors")) == [
        "demo-step00000003.safetensors", "demo-step00000006.safetensors", "demo-step00000009.safetensors",
        "demo.safetensors"]
    item = demo.manifest("train")["items"][0]
    assert [s[0] for s in item["steps"]] == [3, 6, 9] and item["snapshots"] == []
    at_6 = load_file(str(out / "demo-step00000006.safetensors"))
    assert not _same(at_6, load_file(str(out / "demo-step00000003.safetensors")))
    assert not _same(at_6, load_file(str(out / "demo.safetensors")))

    # keep_last keeps the last N step files
    demo.edit(lambda d: d["output"].update(keep_last=1))
    demo.doit("train:demo", build="keep")
    assert demo.report("train")["computed"] == 0  # the same weights: only what is published changes
    assert [p.name for p in out.glob("demo-step*.safetensors")] == ["demo-step00000009.safetensors"]

    # a run of exactly 6 steps ends where the step-6 file was taken (a constant schedule:
    # the rate at a step does not depend on the run's length)
    demo.edit(lambda d: (d["train"].update(max_steps=6, save_every_n_steps=None), d["output"].update(keep_last=None)))
    demo.doit("train:demo", build="sixty")
    assert _same(at_6, load_file(str(out / "demo.safetensors")))
    assert not list(out.glob("demo-step*.safetensors"))  # step files no longer asked for are unpublished
