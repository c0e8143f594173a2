"""Several processes: DDP training through torchrun (gloo on CPU), caches shared out over
ranks, and `doit -n 2` over projects that share images — all through the real CLIs on a
tiny project (5 images of 64², the built-in tiny SD1 model)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import WS, init_workspace
from conftest import copy_workspace as _copy
from lorabuild.train.dist import Rank, micro_batches
from lorabuild.train.plan import Sample, epoch_batches

PROJECT = {
    "base_model": "builtin:tiny-sd1",
    "dataset": {"dirs": ["data"]},
    "resize": {"max_side": 128},
    "bucket": {"resolution": 64, "min_reso": 64, "max_reso": 128, "step": 64},
    "network": {"dim": 4, "alpha": 4, "train_text_encoder": False},
    "train": {"learning_rate": 0.002, "epochs": 2, "batch_size": 1, "seed": 7, "save_every_n_epochs": 1},
    "output": {"save_precision": "fp32"},
}


def _write_project(ws: WS, name: str, **train) -> None:
    doc = yaml.safe_load(yaml.safe_dump(PROJECT))
    doc["train"].update(train)
    (ws.root / "projects" / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def _edit(ws: WS, name: str, **train) -> None:
    path = ws.root / "projects" / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["train"].update(train)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> WS:
    """A workspace with project ``a``: 3 red circles and 2 blue squares, each with its caption."""
    root = tmp_path_factory.mktemp("dist") / "ws"
    init_workspace(root)
    (root / "projects" / "demo.yaml").unlink()
    demo = root / "projects" / "demo"
    for concept, n in (("10_redcircle shape", 3), ("10_bluesquare shape", 2)):
        dst = root / "projects" / "data" / f"1_{concept.split('_', 1)[1]}"
        dst.mkdir(parents=True)
        for src in sorted((demo / concept).glob("*.png"))[:n]:
            shutil.copy2(src, dst / src.name)
            shutil.copy2(src.with_suffix(".txt"), dst / src.with_suffix(".txt").name)
    shutil.rmtree(demo)
    ws = WS(root)
    _write_project(ws, "a")
    return ws


@pytest.fixture(scope="module")
def cached(template, tmp_path_factory) -> WS:
    """The template with project a's caches built (one process)."""
    ws = _copy(template, tmp_path_factory.mktemp("cached") / "ws")
    ws.doit("latents:a", "textemb:a", build="caches")
    return ws


@pytest.fixture(scope="module")
def reference(cached, tmp_path_factory) -> WS:
    """Project a trained by one process accumulating 2 batches per step."""
    ws = _copy(cached, tmp_path_factory.mktemp("one") / "ws")
    _edit(ws, "a", gradient_accumulation_steps=2)
    ws.doit("train:a", build="one")
    return ws


def _same_run(one: WS, other: WS) -> None:
    """Every saved epoch's LoRA equal within float rounding, and the same loss log."""
    for f in ("a-000001.safetensors", "a.safetensors"):
        x, y = load_file(one.root / "output" / "a" / f), load_file(other.root / "output" / "a" / f)
        assert x.keys() == y.keys() and len(x) > 0
        for k in x:
            assert torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-7), (f, k)
        moved = max(float(v.abs().max()) for k, v in y.items() if k.endswith("lora_up.weight"))
        assert moved > 0  # it trained: lora_up starts at zero
    log = lambda ws: list(csv.DictReader((ws.root / "output" / "a" / "loss.csv").open()))  # noqa: E731
    x, y = log(one), log(other)
    assert len(x) == len(y) == 2 * 3  # ceil(5 batches / 2) steps × 2 epochs
    assert [r["step"] for r in x] == [r["step"] for r in y]
    assert torch.allclose(torch.tensor([float(r["loss"]) for r in x]), torch.tensor([float(r["loss"]) for r in y]),
                          rtol=1e-5)


def _steps(mbs: list) -> list[list[tuple[int, bool]]]:
    """A rank's micro-batches grouped into optimizer steps: (batch, is the step's last) per live one."""
    steps, cur = [], []
    for b, live, ends, last in mbs:
        if live:
            cur.append((b[0], last))
        if ends:
            steps.append(cur)
            cur = []
    assert not cur
    return steps


def test_steps_share_batches_out_by_rank():
    """Over all ranks, each step holds exactly the batches of one process's step with
    world × accum accumulation; every rank ends every step (one all-reduce each, a filler
    where it has no batch), and exactly one rank holds the step's last batch (the logged loss)."""
    batches = [[i] for i in range(11)]
    for accum, world in ((1, 2), (2, 2), (1, 3), (3, 4)):
        expected = [[i for i, _ in step] for step in _steps(micro_batches(batches, accum * world))]
        ranks = [_steps(micro_batches(batches, accum, Rank(r, world))) for r in range(world)]
        assert all(len(steps) == len(expected) for steps in ranks), (accum, world)
        for s, want in enumerate(expected):
            assert sorted(i for steps in ranks for i, _ in steps[s]) == want, (accum, world, s)
            assert [i for steps in ranks for i, last in steps[s] if last] == [want[-1]]


def _run(ws: WS, *args: str, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "lorabuild", *args]
    env = {**os.environ, "LORABUILD_BUILD": "dist"}
    if kw.get("background"):
        return subprocess.Popen(cmd, cwd=ws.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ws.root, capture_output=True, text=True, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_accumulating_twice(cached, reference, tmp_path):
    """2 gloo ranks × accumulation 1 train what 1 process × accumulation 2 trains: the same
    optimizer steps over the same batches (the 5th batch makes a short last step, where rank
    1 joins the all-reduce with a zero-weight filler), so the LoRA of every saved epoch is equal."""
    two = _copy(cached, tmp_path / "two")
    proc = _run(two, "train", "a", "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = two.report("train", "a")
    assert report["computed"] == 1 and any("trained by 2 processes" in n for n in report["notes"]), report
    _same_run(reference, two)
    # the global batch is what the LoRA is keyed on: one process accumulating twice finds it trained
    _edit(two, "a", gradient_accumulation_steps=2)
    two.doit("train:a", build="again")
    assert two.report("train", "a")["reused"] == 1


def test_two_nodes_through_the_rendezvous_endpoint(cached, reference, tmp_path):
    """Two "nodes" of one process each on this machine, meeting at --rdzv-endpoint: node 1 only
    runs its rank, node 0 runs the build and writes; the LoRA is that of one process
    accumulating 2 batches."""
    ws = _copy(cached, tmp_path / "ws")
    endpoint = f"127.0.0.1:{_free_port()}"
    node = ["train", "a", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--node-rank"]
    follower = _run(ws, *node, "1", background=True)
    try:
        lead = _run(ws, *node, "0")
        out, _ = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert lead.returncode == 0, lead.stdout + lead.stderr
    assert follower.returncode == 0 and "node 1 of 2 finished" in out, out
    assert any("trained by 2 processes on 2 nodes" in n for n in ws.report("train", "a")["notes"])
    _same_run(reference, ws)


def test_failing_rank_stops_the_run_naming_rank_and_error(cached, tmp_path):
    """A latent that only rank 1 reads in epoch 1 is truncated: the run stops, the error names
    rank 1 and the entry, nothing is published, and the entry is removed for the next build."""
    ws = _copy(cached, tmp_path / "ws")
    lat = {e["id"]: e for e in ws.manifest("latents", "a")["items"]}
    samples = [Sample(i, tuple(e["bucket"]), 1) for i, e in sorted(lat.items())]
    batches = epoch_batches(samples, 1, PROJECT["train"]["seed"], 1)
    share = lambda r: {s.id for b, live, *_ in micro_batches(batches, 1, Rank(r, 2)) if live for s, _ in b}  # noqa: E731
    victim = sorted(share(1) - share(0))[0]
    h = lat[victim]["hash"]
    entry = ws.root / "cache" / "objects" / "latents" / h[:2] / f"{h[2:]}.safetensors"
    entry.write_bytes(entry.read_bytes()[:40])
    # as an entry written before sidecars kept checksums: the parent's check cannot see the damage
    side = entry.with_name(entry.name.split(".", 1)[0] + ".json")
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "sum"}))
    proc = _run(ws, "train", "a", "--nproc", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "read by rank 1 of 2" in out and "unreadable" in out and entry.name in out, out[-3000:]
    assert not (ws.root / "output" / "a" / "a.safetensors").exists()
    assert not entry.exists()  # removed, so the next build recomputes exactly this entry


def test_sharded_caches_compute_each_key_once(template, tmp_path):
    """With train.processes 2 the latent and text-embedding stages share their missing keys out
    over 2 ranks: every key computed once (3 + 2), every entry whole; a later single missing
    key is computed here."""
    ws = _copy(template, tmp_path / "ws")
    _edit(ws, "a", processes=2)
    ws.doit("latents:a", "textemb:a", build="sharded")
    for stage, n in (("latents", 5), ("textemb", 5)):
        rep = ws.report(stage, "a")
        assert (rep["computed"], rep["reused"]) == (n, 0), rep
        assert any(note == "computed by 2 processes: 3 + 2" for note in rep["notes"]), rep
        for e in ws.manifest(stage, "a")["items"]:
            h = e["hash"]
            assert load_file(ws.root / "cache" / "objects" / stage / h[:2] / f"{h[2:]}.safetensors")
    src = next((ws.root / "projects" / "data").glob("1_redcircle*/*.png"))
    Image.open(src).transpose(Image.FLIP_LEFT_RIGHT).save(src.with_name("extra.png"))
    ws.doit("latents:a", build="one-more")
    rep = ws.report("latents", "a")
    assert (rep["computed"], rep["reused"]) == (1, 5) and not rep["notes"], rep


def _entries_whole(ws: WS) -> int:
    n = 0
    for f in (ws.root / "cache" / "objects").glob("*/*/*"):
        if f.suffix == ".safetensors":
            assert load_file(f) is not None
        elif f.suffix == ".png":
            with Image.open(f) as im:
                im.load()
        n += 1
    assert not list((ws.root / "cache" / "objects").glob("*/*/.*"))  # no temp file left behind
    return n


def test_doit_n2_two_projects_share_entries_computed_once(template, tmp_path):
    """`doit -n 2` builds a and b (the same images, other learning rates) at once: both LoRAs
    appear, every entry reads back whole, and each shared working copy, latent and embedding
    was computed by exactly one of the two processes (the counts add up to the keys)."""
    ws = _copy(template, tmp_path / "ws")
    for name, lr in (("a", 0.002), ("b", 0.001)):
        _write_project(ws, name, learning_rate=lr, epochs=1, save_every_n_epochs=None)
    proc = ws.doit("-n", "2", "train:a", "train:b", build="parallel")
    assert "train:a" in proc.stdout and "train:b" in proc.stdout
    for name in ("a", "b"):
        assert load_file(ws.root / "output" / name / f"{name}.safetensors")
        assert ws.report("train", name)["computed"] == 1
    for stage in ("resize", "bucket", "latents", "textemb"):
        a, b = ws.report(stage, "a"), ws.report(stage, "b")
        keys = {e["hash"] for e in ws.manifest(stage, "a")["items"]}
        assert keys == {e["hash"] for e in ws.manifest(stage, "b")["items"]}
        assert a["computed"] + b["computed"] == len(keys), (stage, a, b)
        assert a["computed"] + a["reused"] == b["computed"] + b["reused"] == 5
    assert _entries_whole(ws) > 0
