"""`lorabuild serve`'s API through Starlette's TestClient: the guards (path traversal, token off
loopback, CSRF and same origin), the queue on disk, captions and the editor, and what the
build writes for the dashboard (the live training file, the A1111 ``parameters`` chunk)."""
from __future__ import annotations

import contextlib
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from lorabuild.serve.app import create_app  # noqa: E402
from conftest import init_workspace

ORIGIN = "http://127.0.0.1:8765"


@pytest.fixture
def fresh(tmp_path) -> Path:
    """An unbuilt workspace from `lorabuild init` (no model needed to show it)."""
    root = tmp_path / "ws"
    init_workspace(root)
    return root


def client(root: Path, host: str = "127.0.0.1", run_queue: bool = False) -> TestClient:
    return TestClient(create_app(root, host, run_queue=run_queue), base_url=ORIGIN)


def writes(c: TestClient) -> dict:
    return {"X-CSRF-Token": c.app.state.guard.csrf, "Origin": ORIGIN}


CAPTION = "demo/10_redcircle shape/redcircle_00.png"


# --- files: only output/, cache/ and dataset folders ------------------------------------------

def test_workspace_files_are_served_from_output_cache_and_datasets_only(fresh, tmp_path):
    (fresh / "output").mkdir()
    (fresh / "output" / "note.txt").write_text("in output")
    (fresh / "cache").mkdir()
    (fresh / "cache" / "c.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    (fresh / "output" / "link.txt").symlink_to(secret)  # a symlink out of the workspace
    (fresh / "projects" / "demo" / "10_redcircle shape" / "out.txt").symlink_to(secret)
    with client(fresh) as c:
        assert c.get("/files/output/note.txt").text == "in output"
        assert c.get("/files/cache/c.json").status_code == 200
        assert c.get("/files/projects/demo/10_redcircle%20shape/redcircle_00.png").status_code == 200
        assert c.get(f"/dataset/demo/{CAPTION}").headers["content-type"] == "image/png"
        refused = [
            "/files/output/..%2f..%2fsecret.txt", "/files/%2e%2e/secret.txt", "/files/output/%2E%2E/%2E%2E/secret.txt",
            "/files/output/%252e%252e/%252e%252e/secret.txt",  # double-encoded
            f"/files/{secret}", f"/files/%2F{str(secret).lstrip('/')}", "/files/C:/Windows/win.ini",
            "/files/output\\..\\..\\secret.txt", "/files/output/link.txt", "/files/projects/demo.yaml", "/files/dodo.py",
            "/dataset/demo/demo/10_redcircle%20shape/out.txt", "/dataset/demo/..%2F..%2Fdodo.py",
            f"/dataset/demo/{str(secret).lstrip('/')}",
        ]
        answers = {u: c.get(u) for u in refused}
    assert {u: r.status_code for u, r in answers.items() if r.status_code not in (400, 403, 404)} == {}
    assert not [u for u, r in answers.items() if "TOPSECRET" in r.text]


def test_symlinked_dataset_folder_is_served_but_nothing_beyond_it(fresh, tmp_path):
    """A dataset folder may live elsewhere (the project names it); its files are served, its neighbours not."""
    elsewhere = tmp_path / "photos"
    (elsewhere / "5_cat").mkdir(parents=True)
    (fresh / "projects" / "demo" / "10_redcircle shape" / "redcircle_00.png").rename(elsewhere / "5_cat" / "a.png")
    (tmp_path / "photos" / "private.txt").write_text("private")
    (fresh / "projects" / "more").symlink_to(elsewhere, target_is_directory=True)
    text = (fresh / "projects" / "demo.yaml").read_text().replace("dirs: [demo]", "dirs: [demo, more]")
    (fresh / "projects" / "demo.yaml").write_text(text)
    with client(fresh) as c:
        assert c.get("/dataset/demo/more/5_cat/a.png").status_code == 200
        assert c.get("/dataset/demo/more/private.txt").status_code == 403
        assert c.get("/dataset/demo/more/5_cat/%2E%2E/private.txt").status_code == 400


# --- who may ask, and which writes --------------------------------------------------------------

def test_a_network_bind_refuses_every_request_without_its_token(fresh):
    c = client(fresh, host="0.0.0.0")
    token = c.app.state.guard.token
    assert token and len(token) >= 24
    with c:
        for url in ("/", "/api/projects", "/api/events", "/files/projects/demo.yaml", f"/dataset/demo/{CAPTION}"):
            assert c.get(url).status_code == 401, url
        assert c.get("/api/projects", headers={"X-Lorabuild-Token": "wrong"}).status_code == 401
        assert c.get("/api/projects", headers={"X-Lorabuild-Token": token}).json() == {"projects": ["demo"]}
        first = c.get(f"/?token={token}")  # the printed link: sets the cookie the page's requests carry
        assert first.status_code == 200 and "lorabuild_token" in first.headers["set-cookie"]
        assert c.get("/api/projects").status_code == 200
        c.cookies.clear()
        assert c.get("/api/projects").status_code == 401


def test_lorabuild_serve_on_a_network_address_prints_a_token_and_refuses_requests_without_it(fresh):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lorabuild", "serve", "--host", "0.0.0.0", "--port", str(port)],
                            cwd=fresh, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = [proc.stdout.readline() for _ in range(3)]
        token = printed[1].strip()
        assert "needs this token" in printed[0] and printed[2].strip().endswith(f"?token={token}")
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                refused = httpx.get(f"{base}/api/projects")
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        assert httpx.get(f"{base}/api/projects?token={token}x").status_code == 401
        assert httpx.get(f"{base}/api/projects?token={token}").json() == {"projects": ["demo"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_loopback_answers_only_to_a_localhost_host_header(fresh):
    with client(fresh) as c:
        assert c.get("/api/projects").status_code == 200
        assert c.get("/api/projects", headers={"Host": "localhost:8765"}).status_code == 200
        assert c.get("/api/projects", headers={"Host": "attacker.example:8765"}).status_code == 403  # DNS rebinding
        assert c.app.state.guard.token is None


def test_a_write_without_the_csrf_token_or_from_another_origin_is_refused(fresh):
    cap = fresh / "projects" / CAPTION.replace(".png", ".txt")
    before = cap.read_text()
    body = {"id": CAPTION, "text": "hacked", "expected": before.strip()}
    with client(fresh) as c:
        good = writes(c)
        assert c.put("/api/projects/demo/caption", json=body).status_code == 403
        assert c.put("/api/projects/demo/caption", json=body, headers={"Origin": ORIGIN}).status_code == 403
        assert c.put("/api/projects/demo/caption", json=body,
                     headers={**good, "X-CSRF-Token": "guess"}).status_code == 403
        assert c.put("/api/projects/demo/caption", json=body,
                     headers={**good, "Origin": "http://evil.example"}).status_code == 403
        assert c.put("/api/projects/demo/caption", json=body,
                     headers={"X-CSRF-Token": good["X-CSRF-Token"]}).status_code == 403  # no origin at all
        assert c.post("/api/queue", json={"target": "train:demo"}).status_code == 403
        assert c.put("/api/projects/demo/yaml", json={"text": "x: 1", "sha": ""}).status_code == 403
        assert cap.read_text() == before and c.get("/api/queue").json() == {"entries": []}
        r = c.put("/api/projects/demo/caption", json=body, headers=good)
        assert r.status_code == 200, r.text
    assert cap.read_text() == "hacked\n"


def test_a_caption_changed_meanwhile_is_not_overwritten(fresh):
    cap = fresh / "projects" / CAPTION.replace(".png", ".txt")
    with client(fresh) as c:
        shown = c.get("/api/projects/demo/dataset").json()["concepts"][1]["images"][0]
        assert shown["id"] == CAPTION and shown["caption_seen"] == cap.read_text().strip()
        cap.write_text("edited in another window\n")
        r = c.put("/api/projects/demo/caption", json={"id": CAPTION, "text": "mine", "expected": shown["caption_file"]},
                  headers=writes(c))
        assert r.status_code == 409 and "changed since" in r.json()["error"]
        r = c.put("/api/projects/demo/caption", json={"id": "../../dodo.py", "text": "x", "expected": None},
                  headers=writes(c))
        assert r.status_code == 404
    assert cap.read_text() == "edited in another window\n"


def test_the_dataset_view_shows_the_taggers_suggestions_and_a_click_adds_one(fresh, monkeypatch):
    """Off without a tagger section, one line before the tag stage has run, then each image's
    tags with their confidences from the stage's cache (no model runs in the request), marked
    where the caption has them; adding one goes through the caption write."""
    import math

    tt = pytest.importorskip("test_tagger")  # the tiny ONNX tagger (skips without onnx)
    from conftest import WS

    ws = WS(fresh)
    red, boxed = "demo/10_redcircle shape/redcircle_07.png", CAPTION  # without / with a caption file
    cap = fresh / "projects" / CAPTION.replace(".png", ".txt")
    with client(fresh) as c:
        d = c.get("/api/projects/demo/dataset").json()
        assert d["tagger"]["state"] == "off" and "no tagger section" in d["tagger"]["line"]
        assert {im["suggestions"] for cc in d["concepts"] for im in cc["images"]} == {None}
        tt.make_tagger(fresh / "projects" / "tagger-model")
        ws.edit(lambda y: y.update(tagger={"model": "tagger-model", "mode": "merge", "additional_tags": ["sks"]}))
        d = c.get("/api/projects/demo/dataset").json()
        assert d["tagger"]["state"] == "not run" and "build tag:demo" in d["tagger"]["line"]
        ws.doit("tag:demo", build="t1")
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the view reads the stage's results: no model runs
        d = c.get("/api/projects/demo/dataset").json()
        images = {im["id"]: im for cc in d["concepts"] for im in cc["images"]}
        assert d["tagger"]["state"] == "ran" and "mode merge" in d["tagger"]["line"]
        assert len(images) == 16 and all(im["suggestions"] for im in images.values())  # merge tags every image
        got = {s["tag"]: s for s in images[boxed]["suggestions"]}
        manifest = {e["id"]: e for e in ws.manifest("tag")["items"]}
        assert list(got) == manifest[boxed]["tags"]  # the stage's tags, in its order (highest first)
        assert got["long hair"]["score"] == pytest.approx(1 / (1 + math.exp(-2)), abs=1e-4)  # the model's bias alone
        assert got["simple background"]["score"] == pytest.approx(0.5, abs=1e-4)
        assert not any(s["in_caption"] for s in got.values())  # redcircle, shape, white background, …
        # an image without a caption file: the training sees the tagger's caption, so all are in it
        assert all(s["in_caption"] for s in images[red]["suggestions"])

        # a tag in the file, spelt with an underscore, counts as there (as the tagger compares tags)
        before = cap.read_text().strip()
        cap.write_text(before + ", long_hair\n")
        d = c.get("/api/projects/demo/dataset").json()
        marks = {s["tag"]: s["in_caption"] for cc in d["concepts"] for im in cc["images"] if im["id"] == boxed
                 for s in im["suggestions"]}
        assert marks["long hair"] is True and marks["simple background"] is False

        # the click: the caption write with the tag appended, CSRF-checked, answered with the new marks
        body = {"id": boxed, "text": f"{before}, long_hair, simple background", "expected": f"{before}, long_hair"}
        assert c.put("/api/projects/demo/caption", json=body).status_code == 403
        r = c.put("/api/projects/demo/caption", json=body, headers=writes(c))
        assert r.status_code == 200, r.text
        marks = {s["tag"]: s["in_caption"] for s in r.json()["image"]["suggestions"]}
        assert marks["simple background"] is True and marks["long hair"] is True
        assert cap.read_text() == f"{before}, long_hair, simple background\n"

        # a damaged cache entry: the tags still show (without scores) and the view leaves the entry be
        from lorabuild.cache import Store

        store = Store(fresh / "cache", "tag", ".tags.json")
        path = store.path(manifest[boxed]["hash"])
        path.write_text("{trunc")
        shown = next(im for cc in c.get("/api/projects/demo/dataset").json()["concepts"] for im in cc["images"]
                     if im["id"] == boxed)["suggestions"]
        assert [s["tag"] for s in shown] == manifest[boxed]["tags"] and {s["score"] for s in shown} == {None}
        assert path.read_text() == "{trunc"


# --- the queue -------------------------------------------------------------------------------------

def test_the_queue_is_kept_on_disk_across_a_server_restart(fresh):
    with client(fresh) as c:
        h = writes(c)
        ids = [c.post("/api/queue", json={"target": t}, headers=h).json()["id"] for t in ("train:demo", "sample:demo",
                                                                                            "latents:demo")]
        bad = [c.post("/api/queue", json={"target": t}, headers=h) for t in
               ("train:demo; rm -rf /", "train:nosuch", "forget:demo", "", "train:../demo")]
        assert [r.status_code for r in bad] == [400] * 5
        assert c.post(f"/api/queue/{ids[2]}/stop", json={}, headers=h).json() == {"result": "cancelled"}
    with client(fresh) as again:  # a new server on the same workspace
        entries = again.get("/api/queue").json()["entries"]
    assert [(e["id"], e["target"], e["state"]) for e in entries] == [
        (ids[0], "train:demo", "pending"), (ids[1], "sample:demo", "pending"), (ids[2], "latents:demo", "cancelled")]
    assert json.loads((fresh / "cache/serve/queue.json").read_text())["entries"] == entries


def test_queued_targets_run_one_after_another_with_their_logs(fresh):
    with client(fresh, run_queue=True) as c:
        h = writes(c)
        first = c.post("/api/queue", json={"target": "resize:demo"}, headers=h).json()["id"]
        second = c.post("/api/queue", json={"target": "bucket:demo"}, headers=h).json()["id"]
        for _ in range(600):
            entries = {e["id"]: e for e in c.get("/api/queue").json()["entries"]}
            if all(entries[i]["state"] not in ("pending", "running") for i in (first, second)):
                break
            time.sleep(0.2)
        logs = [c.get(f"/api/queue/{i}/log").json()["log"] for i in (first, second)]
    assert [entries[i]["state"] for i in (first, second)] == ["done", "done"]
    assert entries[second]["started"] >= entries[first]["ended"]
    assert "resize:demo: 16 items: computed" in logs[0] and "bucket:demo: 16 items: computed" in logs[1]


# --- the editor --------------------------------------------------------------------------------------

def test_the_editor_validates_as_lorabuild_validate_does_and_saves_the_text_as_typed(fresh):
    path = fresh / "projects" / "demo.yaml"
    original = path.read_text()
    bad = original.replace("  epochs: 6", "  epochs: -6")
    with client(fresh) as c:
        h = writes(c)
        problems = c.post("/api/projects/demo/validate", json={"text": bad}, headers=h).json()["problems"]
        cli = subprocess.run([sys.executable, "-m", "lorabuild", "validate", "projects/demo.yaml"], cwd=fresh,
                             capture_output=True, text=True)
        assert cli.returncode == 0
        line = bad.splitlines().index("  epochs: -6") + 1
        assert [(p["line"], p["field"]) for p in problems] == [(line, "train.epochs")]
        sha = c.get("/api/projects/demo/yaml").json()["sha"]
        r = c.put("/api/projects/demo/yaml", json={"text": bad, "sha": sha}, headers=h)
        assert r.status_code == 422 and f"line {line}:" in r.json()["error"]
        assert path.read_text() == original
        typed = original.replace("  epochs: 6", "  epochs: 3      # fewer: a quick look first")
        assert c.put("/api/projects/demo/yaml", json={"text": typed, "sha": sha}, headers=h).status_code == 200
        assert path.read_text() == typed  # comments kept, byte for byte
        assert c.put("/api/projects/demo/yaml", json={"text": original, "sha": sha}, headers=h).status_code == 409
    assert not list((fresh / "projects").glob(".*"))  # the validation temp files are gone


# --- on a built demo: status after a caption edit, the live file, PNG settings -------------------------

def test_a_caption_edit_shows_textemb_stale_for_exactly_that_caption(demo):
    with client(demo.root) as c:
        stages = c.get("/api/projects/demo").json()["status"]["stages"]
        assert {s: v["state"] for s, v in stages.items()} == dict.fromkeys(stages, "up to date")
        r = c.put("/api/projects/demo/caption", json={"id": CAPTION, "text": "redcircle, shape, new words",
                                                       "expected": (demo.root / "projects" / CAPTION).with_suffix(".txt").read_text().strip()},
                  headers=writes(c))
        assert r.status_code == 200
        stages = c.get("/api/projects/demo").json()["status"]["stages"]
    assert (stages["textemb"]["state"], stages["textemb"]["why"]) == ("stale", ["1 caption files changed"])
    assert stages["resize"]["state"] == "up to date" and stages["latents"]["state"] == "up to date"
    cli = json.loads(demo.lorabuild("status", "demo", "--json").stdout)
    assert cli["stages"] == stages  # the same answer as `lorabuild status`


def test_the_train_stage_leaves_a_live_file_with_every_step(demo):
    live = json.loads((demo.root / "cache/live/demo/train.json").read_text())
    with open(demo.root / "output/demo/loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert live["state"] == "done" and live["step"] == live["total_steps"] == len(rows) == len(live["loss"])
    assert [r[0] for r in live["loss"]] == [int(r["step"]) for r in rows]
    assert [round(r[2], 6) for r in live["loss"]] == [round(float(r["loss"]), 6) for r in rows]


def test_every_sample_png_carries_its_settings_as_a1111_parameters(demo):
    from PIL import Image

    samples = demo.root / "output/demo/samples"
    with Image.open(next(samples.glob("e000001-01-*.png"))) as im:
        epoch = im.text["parameters"]
    with Image.open(next(samples.glob("base-00-*.png"))) as im:
        base = im.text["parameters"]
    assert epoch.startswith("bluesquare, shape, yellow background <lora:demo:1>\n")
    assert "Steps: 8, Sampler: " in epoch and "Seed: 7, Size: 128x128" in epoch and 'Lora hashes: "demo: ' in epoch
    assert base.startswith("redcircle, shape, white background\n") and "<lora:" not in base
    with client(demo.root) as c:
        grid = c.get("/api/projects/demo/samples").json()
    assert [r["label"] for r in grid["rows"]] == ["base model", "epoch 1"] and grid["columns"] == [0, 1]
    assert grid["rows"][1]["cells"]["1"]["parameters"] == epoch


@contextlib.contextmanager
def sigint_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_stopping_a_build_keeps_the_last_finished_epochs_state_and_train_continues_from_it(demo):
    demo.edit(lambda d: d["train"].update(epochs=2, learning_rate=0.003))  # a new run: no earlier state fits it
    states = demo.root / "cache/objects/train"
    # as `lorabuild serve &` from a script: the server, and every build it starts, inherit SIGINT
    # ignored; Stop must still reach the build (the build takes SIGINT back: faults.STOPPABLE)
    with sigint_ignored(), client(demo.root, run_queue=True) as c:
        h = writes(c)
        eid = c.post("/api/queue", json={"target": "train:demo"}, headers=h).json()["id"]
        for _ in range(12000):  # until this run has saved its first training state (after epoch 1)
            entry = next(e for e in c.get("/api/queue").json()["entries"] if e["id"] == eid)
            if entry["started"] and any(p.stat().st_mtime >= entry["started"] for p in states.glob("*/[!.]*.pt")):
                break
            time.sleep(0.1)
        assert c.post(f"/api/queue/{eid}/stop", json={}, headers=h).json() == {"result": "stopping"}
        for _ in range(1200):
            entry = next(e for e in c.get("/api/queue").json()["entries"] if e["id"] == eid)
            if entry["state"] != "running":
                break
            time.sleep(0.1)
    assert entry["state"] == "stopped", entry
    assert "the training state of epoch 1 is kept" in entry["note"]
    live = json.loads((demo.root / "cache/live/demo/train.json").read_text())
    assert live["state"] == "stopped" and 40 <= live["step"] < 80
    demo.doit("train:demo", build="again")
    assert "continued from the training state after epoch 1 (step 40)" in " ".join(demo.report("train")["notes"])
