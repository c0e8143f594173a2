"""bench/gpu.py (issue 27) on the CPU with the built-in tiny models, so the script a GPU machine
runs does not rot: every training case trains through the real trainer, its row has finite
numbers, and the LoRA changed the UNet's output in every precision."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_quick_runs_on_the_cpu_and_every_case_trains(tmp_path):
    out, rows = tmp_path / "RESULTS.md", tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--device", "cpu",
                           "--out", str(out), "--jsonl", str(rows), "--work", str(tmp_path / "work"),
                           "--big-dataset", "200"], capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "## GPU training (--quick)" in text and "(no GPU)" in text and "torch " in text
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| case") and not line.startswith("| model")]
    table = [c for c in cells if len(c) == 16]  # the training table's rows
    names = {c[0] for c in table}
    for name in ("sd15 b1 bf16", "sd15 b4 fp16 gc", "sd15 b1 fp32", "sdxl b1 bf16 gc, cached TE",
                 "sd15 b1 bf16, 200 latents"):
        assert name in names, names
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    train = [r for r in got if "case" in r]
    assert sorted(r["case"]["name"] for r in train) == sorted(names)
    for r in train:
        assert "error" not in r, r
        assert r["steps"] == r["case"]["steps"] and r["steps_run"] == r["steps"] and r["grads_bad"] == 0, r
        for k in ("s_per_step", "first_s", "loss", "delta_out"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["losses_finite"] and r["lora_finite"] and r["lora_up_max"] > 0, r
    assert {r["case"]["precision"] for r in train} == {"no", "fp16", "bf16"}
    # the table says the same: a number in s/step, and no case whose LoRA left the output unchanged
    for row in table:
        assert re.fullmatch(r"\d+\.\d{3}", row[8]), row
        assert "FAIL" not in row[15] and float(row[15]) > 0, row
    assert len([c for c in cells if len(c) == 7]) == 3  # the VAE table
    vae = [r for r in got if "vae" in r]
    assert len(vae) == 3 and all(r["finite"] and r["images_s"] > 0 for r in vae), vae


def test_losses_read_back_together_log_every_step_and_stop_at_the_first_non_finite_one(monkeypatch):
    """The trainer keeps losses on the device and reads them together (a read waits for the GPU):
    the log still gets every optimizer step in order, with the running mean over the live
    micro-batches, and a non-finite loss stops training naming the first step that had one."""
    import torch

    from lorabuild.train import loop as trainer

    monkeypatch.setattr(trainer, "READBACK_SECONDS", 3600.0)
    logged = []
    losses = trainer.LossReadback(lambda *row: logged.append(row[:6] + (list(row[6]),)), every_step=False)
    assert losses.due(1)  # the first step is read at once
    running: list = []
    losses.add(1, 1, torch.tensor(0.5), True, (1e-4, 0.1, True))
    losses.read(running)
    assert not losses.due(2) and logged == [(1, 1, 0.5, 1e-4, 0.1, True, [0.5])]
    losses.add(1, 2, torch.tensor(0.25), True)  # a micro-batch of step 2, then its last one
    losses.add(1, 2, torch.tensor(0.75), True, (1e-4, 0.2, True))
    losses.add(1, 3, torch.tensor(1.0), False, (1e-4, 0.3, False))  # a filler: logged, not in the mean
    assert len(logged) == 1  # nothing read until it is due (or the epoch ends)
    losses.read(running)
    assert [r[0] for r in logged] == [1, 2, 3] and logged[1][2] == 0.75 and running == [0.5, 0.25, 0.75]
    losses.add(1, 4, torch.tensor(0.5), True, (1e-4, 0.4, True))
    losses.add(1, 5, torch.tensor(float("nan")), True, (1e-4, 0.5, True))
    losses.add(1, 6, torch.tensor(float("inf")), True, (1e-4, 0.6, True))
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, step 5: stopping"):
        losses.read(running)
    assert [r[0] for r in logged] == [1, 2, 3, 4]  # the steps before it are logged, none after
