"""``lorabuild status`` says what is stale and why, and agrees with what doit then does."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys


def _status(ws) -> dict:
    proc = ws.lorabuild("status", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    return {k: v for k, v in json.loads(proc.stdout)["stages"].items()}


def _check_agreement(ws, build):
    before = _status(ws)
    stale = {s for s, v in before.items() if v["state"] == "stale"}
    maybe = {s for s, v in before.items() if v["state"] == "waits on upstream"}
    ws.doit("sample:demo", build=build)
    ran = ws.ran(build)
    assert stale <= ran <= stale | maybe, (before, ran)
    assert all(v["state"] == "up to date" for v in _status(ws).values())
    return before


def test_status_after_each_kind_of_edit(demo):
    demo.shorten()  # 4 training steps an epoch: this test builds four times
    demo.doit("sample:demo", build="short")
    assert all(v["state"] == "up to date" for v in _status(demo).values())

    demo.edit(lambda d: d["train"].update(learning_rate=0.001))
    st = _check_agreement(demo, "lr")
    assert st["train"]["state"] == "stale" and "train.learning_rate: 0.002 → 0.001" in st["train"]["why"]
    assert st["latents"]["state"] == "up to date" and st["sample"]["state"] == "waits on upstream"

    shutil.copy(demo.data / "10_redcircle shape" / "redcircle_00.png", demo.data / "10_redcircle shape" / "copy.png")
    st = _check_agreement(demo, "img")
    assert st["resize"]["why"] == ["1 images added"]

    (demo.data / "10_bluesquare shape" / "bluesquare_01.txt").write_text("bluesquare, edited\n")
    st = _check_agreement(demo, "cap")
    assert st["textemb"]["state"] == "stale" and "1 caption files changed" in st["textemb"]["why"]
    assert st["latents"]["state"] == "up to date"

    demo.edit(lambda d: d["bucket"].update(step=128, min_reso=128, max_reso=256))
    st = _check_agreement(demo, "bucket")
    assert "bucket.step: 64 → 128" in st["bucket"]["why"] and st["resize"]["state"] == "up to date"


def test_status_from_a_subfolder_of_the_workspace_agrees_with_status_from_its_root(demo):
    demo.edit(lambda d: d["train"].update(learning_rate=0.004))
    at_root = demo.lorabuild("status", "demo")
    below = subprocess.run([sys.executable, "-m", "lorabuild", "status", "demo"], cwd=demo.root / "projects" / "demo",
                           capture_output=True, text=True)
    assert below.stdout == at_root.stdout and "train    stale: train.learning_rate: 0.002 → 0.004" in below.stdout
