"""Faults lose nothing: builds killed at many points, and a disk that fills up, end as a clean build does."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import WS, init_workspace
from figures import COUNTS, record

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: process groups, SIGKILL, RLIMIT_FSIZE")


def _fresh_workspace(tmp_path: Path) -> WS:
    root = tmp_path / "ws"
    ws = init_workspace(root)
    # two epochs, epoch 2 saved: its LoRA is the 6-epoch demo's epoch 2 (constant schedule, same seed)
    ws.edit(lambda d: d["train"].update(epochs=2))
    return ws


def _every_entry_reads(ws: WS) -> int:
    """Open every cache entry with the reader its stage uses; returns how many there are."""
    n = 0
    for entry in (ws.root / "cache/objects").glob("*/*/*"):
        if entry.name.startswith(".") or entry.suffix == ".json":
            continue
        json.loads(entry.with_name(entry.name.split(".", 1)[0] + ".json").read_text())
        if entry.suffix == ".safetensors":
            load_file(str(entry))
        elif entry.suffix == ".pt":
            torch.load(entry, weights_only=True)
        else:
            Image.open(entry).load()
        n += 1
    return n


def _same_outputs(ws: WS, reference: WS) -> None:
    out, ref = ws.root / "output/demo", reference.root / "output/demo"
    a, b = load_file(str(out / "demo.safetensors")), load_file(str(ref / "demo-000002.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pngs = sorted((out / "samples").glob("e000002-*.png"))
    assert pngs
    for png in pngs:
        mine, theirs = Image.open(png), Image.open(ref / "samples" / png.name)
        assert mine.tobytes() == theirs.tobytes()  # the same pixels
        # the same A1111 settings, except the LoRA's name: here epoch 2 is the final "demo", there "demo-000002"
        assert mine.text["parameters"].replace("demo:", "demo-000002:") == theirs.text["parameters"]


@POSIX
def test_a_build_killed_at_many_points_ends_as_a_clean_build(tmp_path, built_demo):
    ws = _fresh_workspace(tmp_path)
    kills = 0
    for delay in (2, 4, 7, 11, 16, 22, 29, 37):
        proc = subprocess.Popen([sys.executable, "-m", "doit", "sample:demo"], cwd=ws.root,
                                env={**os.environ, "LORABUILD_BUILD": f"kill{delay}"}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        _every_entry_reads(ws)  # after every kill: whatever is in the cache is whole
    assert kills >= 4
    ws.doit("sample:demo", build="final")
    assert _every_entry_reads(ws) > 0
    _same_outputs(ws, built_demo)
    ws.doit("sample:demo", build="noop")
    assert ws.ran("noop") == set()
    record(f"kill: doit sample:demo SIGKILLed at {kills} points (2–37 s in: resize to sampling); after each, "
           f"every cache entry read back whole; the final build equals an uninterrupted one ({_every_entry_reads(ws)} "
           "entries, LoRA and samples byte-identical)")


def _limit_file_size(nbytes: int):
    def apply():
        import resource  # POSIX only: imported here, so Windows can collect this file

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


@POSIX
def test_a_full_disk_fails_clearly_and_loses_nothing(tmp_path, built_demo):
    ws = _fresh_workspace(tmp_path)
    ws.doit("textemb:demo", build="first")  # the built-in model is written on first use: not under the limit
    # Files over 200 kB cannot be written: images, latents and embeddings fit; the LoRA does not.
    proc = subprocess.run([sys.executable, "-m", "doit", "sample:demo"], cwd=ws.root, capture_output=True, text=True,
                          env={**os.environ, "LORABUILD_BUILD": "full"}, preexec_fn=_limit_file_size(200_000))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "no space to write" in out and "cache/objects/train/" in out and "Traceback" not in out
    assert ws.ran("full") == {"bucket", "latents"}  # train failed: no report
    _every_entry_reads(ws)
    assert not (ws.root / "output/demo/demo.safetensors").exists()
    ws.doit("sample:demo", build="space")
    assert ws.ran("space") == {"train", "sample"}  # what the failed build finished is kept
    _same_outputs(ws, built_demo)
    record("disk full: a 200 kB file-size limit fails the build naming the file; bucket and latents kept; "
           "the next build trains and samples only, to the same LoRA")


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_good_lora(demo):
    lora = demo.root / "output/demo/demo.safetensors"
    good = lora.read_bytes()
    demo.edit(lambda d: d["train"].update(optimizer="sgd", learning_rate=1e30))
    proc = demo.doit("train:demo", build="nan", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert re.search(r"loss is (nan|inf) at epoch 1, step \d+: stopping", out), out[-2000:]
    assert lora.read_bytes() == good  # the output is not replaced by a broken LoRA
    record("numerical fault: lr 1e30 stops at the first non-finite loss, naming epoch and step; output kept")
    demo.edit(lambda d: d["train"].update(optimizer="adamw", learning_rate=0.002))
    demo.doit("train:demo", build="back")
    assert demo.ran("back") == set() or demo.report("train")["computed"] == 0  # the good run is still cached


def test_a_binary_caption_file_is_named(demo):
    bad = demo.data / "10_redcircle shape" / "redcircle_00.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81 not text")
    proc = demo.doit("train:demo", build="bin", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "redcircle_00.txt" in out and "not a UTF-8 text caption" in out
    COUNTS["binary caption files"] += 1
