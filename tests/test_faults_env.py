"""Faults of the workspace and the machine (issue 18, items 4 and 6-8): one bad project, an extreme
image, a really full disk, a read-only cache, cache/ a file, a damaged doit database, Ctrl-C.
Each ends in one clear line and no traceback, loses nothing, and the next build continues."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from figures import outcome, record


def _out(proc) -> str:
    return proc.stdout + proc.stderr


def _entries_read(ws) -> int:
    from test_faults import _every_entry_reads

    return _every_entry_reads(ws)


@contextlib.contextmanager
def _mounted(path: Path, *options: str):
    """A real file system at ``path`` (a size-limited tmpfs, or a read-only bind mount), or a skip
    where this process may not mount (not root, or in a container without CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a file system needs root on Linux")
    cmds = ([["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]
            if options == ("ro",) else [["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)]])
    done = 0
    try:
        for cmd in cmds:
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                pytest.skip(f"{' '.join(cmd)} is not permitted here")
            done += 1
        yield path
    finally:
        if done:
            subprocess.run(["umount", str(path)], check=True)


# --- item 4: one bad project does not block the workspace -----------------------------

def test_a_broken_project_fails_alone_and_validate_names_it(demo):
    projects = demo.root / "projects"
    loop_dir = projects / "other" / "5_x"
    loop_dir.mkdir(parents=True)
    shutil.copy(demo.data / "10_redcircle shape" / "redcircle_00.png", loop_dir)
    (loop_dir / "loop").symlink_to("loop")  # a symlink loop in one project's concept folder
    (projects / "other.yaml").write_text("base_model: builtin:tiny-sd1\ndataset:\n  dirs: [other]\n")
    (projects / "dup.yaml").write_text("base_model: builtin:tiny-sd1\ndataset:\n  dirs: [demo]\noutput:\n  name: demo\n")

    listed = demo.doit("list", "--all", build="list")
    assert "train:demo" in listed.stdout and "Traceback" not in _out(listed)
    ok = demo.doit("train:demo", build="ok")
    status = demo.lorabuild("status", "demo", "--json")
    assert status.returncode == 0 and all(v["state"] == "up to date" for v in json.loads(status.stdout)["stages"].values())
    outcome(_out(listed) + _out(ok) + _out(status), clear=True)

    loop = demo.doit("train:other", build="loop", check=False)
    assert loop.returncode != 0 and "Traceback" not in _out(loop)
    assert "other/5_x/loop cannot be read (Too many levels of symbolic links)" in _out(loop)
    dup = demo.doit("train:dup", build="dup", check=False)
    assert dup.returncode != 0 and "Traceback" not in _out(dup)
    assert "dup.yaml: output.name 'demo' is also the output of" in _out(dup)
    other = demo.lorabuild("status", "other")
    assert other.returncode == 1 and "Too many levels of symbolic links" in _out(other) and "Traceback" not in _out(other)

    proc = demo.lorabuild("validate")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 2, lines
    assert re.match(r"projects/other\.yaml:3:3: dataset: .*other/5_x/loop cannot be read", lines[0]), lines
    assert re.match(r"projects/dup\.yaml:5:9: output.name: 'demo' is also the output of .*demo\.yaml", lines[1]), lines
    for out in (_out(loop), _out(dup), _out(other), proc.stderr):
        outcome(out, clear=True)
    record("one bad project: a symlink loop in its concept folder, or an output.name another project has, fails "
           "its own tasks in one line; doit list, train:demo and status demo work; validate names both")


# --- item 6: an extreme aspect ratio ----------------------------------------------------

def test_a_4000x1_image_is_a_bad_image_named_or_skipped(demo):
    Image.new("RGB", (4000, 1), "red").save(demo.data / "10_redcircle shape" / "strip.png")
    proc = demo.doit("bucket:demo", build="strip", check=False)
    out = _out(proc)
    assert proc.returncode != 0 and "Traceback" not in out
    assert "strip.png (4000x1): only 1.6% of it would fit its bucket 256x64: crop the image, or set " \
           "dataset.on_bad_image: skip" in out
    outcome(out, clear=True)
    demo.edit(lambda d: d["dataset"].update(on_bad_image="skip"))
    proc = demo.doit("train:demo", build="skip")
    table = json.loads((demo.root / "output/demo/buckets/buckets.json").read_text())
    assert len(table["images"]) == 16 and not any("strip" in e["id"] for e in table["images"])
    assert any("skipped demo/10_redcircle shape/strip.png" in n for n in demo.report("bucket")["notes"])
    # the bucket manifest is as before: no latent is encoded again, the LoRA trained before is restored
    assert "latents" not in demo.ran("skip") and demo.report("train")["computed"] == 0
    outcome(_out(proc), clear=True)


def test_contact_sheets_draw_a_crop_thinner_than_a_pixel(tmp_path):
    from lorabuild import buckets
    from lorabuild.cache import Store
    from lorabuild.stages.bucket import contact_sheets, decide

    store = Store(tmp_path / "cache", "resize", ".png")
    params = {"resolution": 128, "min_reso": 64, "max_reso": 256, "step": 64, "no_upscale": False}
    ladder = buckets.make_buckets(128 ** 2, 64, 256, 64)
    entries = []
    for i, size in enumerate([(1024, 1), (1, 1024), (256, 3), (128, 128)]):
        h = f"{i:02d}" + "0" * 62
        store.path(h).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, "blue").save(store.path(h))
        entries.append({"id": f"im{i}.png", "src": h, **decide(*size, params, ladder)})
    contact_sheets(store, entries, tmp_path / "sheets")
    names = sorted(p.name for p in (tmp_path / "sheets").glob("*.jpg"))
    assert names == ["128x128.jpg", "256x64.jpg", "64x256.jpg"]
    with Image.open(tmp_path / "sheets" / "256x64.jpg") as im:
        assert im.size == (2 * 128, 144)  # both wide strips drawn


# --- item 7: a really full disk -----------------------------------------------------------

def test_a_full_filesystem_during_latents_fails_in_one_line_and_the_next_build_continues(demo, tmp_path):
    lat = demo.root / "cache/objects/latents"
    aside = tmp_path / "latents-aside"
    shutil.move(str(lat), aside)  # the latents are recomputed onto a 64 kB file system
    (demo.root / "cache/manifests/demo/latents.json").unlink()
    lora = (demo.root / "output/demo/demo.safetensors").read_bytes()
    with _mounted(lat, "size=64k"):
        proc = demo.doit("train:demo", build="full", check=False)
        out = _out(proc)
        kept = tmp_path / "kept"
        shutil.copytree(lat, kept)  # what fitted: the disk is "freed" by moving it onto the big one
    assert proc.returncode != 0 and "Traceback" not in out and "database or disk is full" not in out
    m = re.search(r"latents:demo: no space to write (cache/objects/latents/\S+) \(No space left on device; "
                  r"(it needs [^,]+, )?[\d.]+ \w+ free there\)", out)
    assert m, out[-3000:]
    outcome(out, clear=True)
    shutil.rmtree(lat)
    shutil.copytree(kept, lat)
    done = len([p for p in lat.glob("*/*.safetensors")]) + len([p for p in lat.glob("*/*.pt")])
    proc = demo.doit("train:demo", build="freed")
    rep = demo.report("latents")
    assert rep["reused"] == done and rep["computed"] == rep["items"] - done  # the finished entries are kept
    # the same latent keys: training is up to date, or restores the LoRA trained before
    assert "train" not in demo.ran("freed") or demo.report("train")["computed"] == 0
    lost = (demo.root / "output/demo/demo.safetensors").read_bytes() != lora
    outcome(_out(proc), clear=True, lost=lost)
    assert not lost and _entries_read(demo) > 0
    record(f"disk full (a 64 kB tmpfs under cache/objects/latents): latents fails naming the entry and the space; "
           f"the next build keeps the {done} entries that fitted and computes {rep['items'] - done}")


def _limit_file_size(nbytes: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def _forget_later_epochs(ws) -> None:
    """Drop the train entries past epoch 1 (the built demo trained 6 epochs and kept epochs 2, 4 and 6):
    a run of 2 or 4 epochs must really train from the epoch-1 state instead of being assembled."""
    for meta in (ws.root / "cache/objects/train").glob("*/*.json"):
        if json.loads(meta.read_text()).get("info", {}).get("epoch", 0) > 1:
            for p in meta.parent.glob(meta.name.split(".", 1)[0] + ".*"):
                p.unlink()


def test_a_full_disk_while_the_training_state_is_saved_names_it_and_the_build_resumes(demo, built_demo):
    """torch.save reports a full disk as ``RuntimeError: unexpected pos``: it is still a disk-full line."""
    train = demo.root / "cache/objects/train"
    _forget_later_epochs(demo)
    demo.edit(lambda d: d["train"].update(epochs=2))
    env = {**os.environ, "LORABUILD_BUILD": "full"}
    cmd = [sys.executable, "-m", "doit", "train:demo"]
    try:
        with _mounted(train, "size=200k"):  # hides the epoch-1 state: training starts over and its state cannot be saved
            proc = subprocess.run(cmd, cwd=demo.root, capture_output=True, text=True, env=env)
        how = "a 200 kB tmpfs over cache/objects/train"
    except pytest.skip.Exception:  # no mounting here: a file-size limit, below the state's size
        train_before = sorted(train.glob("*/*.pt"))
        for p in train_before:
            p.rename(p.with_suffix(".hidden"))
        proc = subprocess.run(cmd, cwd=demo.root, capture_output=True, text=True, env=env,
                              preexec_fn=_limit_file_size(200_000))
        for p in train_before:
            p.with_suffix(".hidden").rename(p)
        how = "a 200 kB file-size limit"
    out = _out(proc)
    assert proc.returncode != 0 and "Traceback" not in out and "unexpected pos" not in out
    assert re.search(r"train:demo: no space to write cache/objects/train/\S+\.pt \((No space left on device|File too "
                     r"large); it needs about [\d.]+ \w+", out), out[-3000:]
    outcome(out, clear=True)
    proc = demo.doit("train:demo", build="resumed")
    assert "continued from the training state after epoch 1" in " ".join(demo.report("train")["notes"])
    a = load_file(str(demo.root / "output/demo/demo.safetensors"))
    b = load_file(str(built_demo.root / "output/demo/demo-000002.safetensors"))
    lost = not (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
    outcome(_out(proc), clear=True, lost=lost)
    assert not lost
    record(f"disk full while the training state is saved ({how}): one line naming the .pt and its size; the next "
           "build continues from the epoch-1 state to the LoRA an uninterrupted build makes")


def test_doit_database_on_a_full_disk_is_one_line(tmp_path):
    """doit writes its database when a run ends; sqlite's "database or disk is full" is said in one line."""
    disk = tmp_path / "disk"
    script = ("import sys; from lorabuild import faults; faults.guard_doit_database()\n"
              "from doit.dependency import SqliteDB, JSONCodec\n"
              f"db = SqliteDB({str(disk / 'doit.sqlite3')!r}, JSONCodec())\n"
              "for i in range(400): db.set(f't{i}', 'x', 'y' * 2000)\n"
              "db.dump(); print('after dump', flush=True)\n")
    with _mounted(disk, "size=128k"):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    out = _out(proc)
    assert proc.returncode == 3 and "Traceback" not in out and "after dump" in out
    assert re.search(r"lorabuild: cannot save doit's record of this build in \S+doit.sqlite3 \(database or disk is "
                     r"full; it needs about [\d.]+ \w+, [\d.]+ \w+ free there\)\. Nothing built is lost", out), out
    outcome(out, clear=True)


# --- item 8: the workspace's own faults ---------------------------------------------------

def test_a_read_only_cache_fails_in_one_line_and_loses_nothing(demo):
    Image.new("RGB", (200, 300), "red").save(demo.data / "10_redcircle shape" / "new.png")
    with _mounted(demo.root / "cache/objects", "ro"):
        proc = demo.doit("bucket:demo", build="ro", check=False)
    out = _out(proc)
    assert proc.returncode != 0 and "Traceback" not in out
    assert re.search(r"resize:demo: cannot write cache/objects/resize/\S+: Read-only file system\. Fix that", out), out
    outcome(out, clear=True)
    demo.doit("bucket:demo", build="rw")
    assert demo.report("resize")["computed"] == 1 and demo.report("resize")["reused"] == 16


@pytest.mark.parametrize("where", ["cache", "cache/locks"])
def test_a_file_where_a_cache_folder_belongs_is_one_line(demo, where):
    path = demo.root / where
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    path.write_text("not a folder")
    outs = [demo.doit("train:demo", build="file", check=False), demo.doit("list", build="file", check=False),
            demo.lorabuild("status", "demo")]
    for proc in outs:
        out = _out(proc)
        assert proc.returncode != 0 and "Traceback" not in out
        assert f"{path} is a file, but lorabuild needs a folder there: move the file away" in out, out
        outcome(out, clear=True)
    path.unlink()
    aside.rename(path)
    demo.doit("train:demo", build="back")
    assert demo.ran("back") == set()  # nothing was lost: all still up to date


@pytest.mark.parametrize("damage", ["garbage", "malformed"])
def test_a_damaged_doit_database_is_moved_aside_and_rebuilt(demo, damage):
    db = demo.root / "cache/doit.sqlite3"
    data = bytearray(db.read_bytes())
    if damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:  # the header intact, the pages behind it overwritten
        for i in range(100, len(data) - 8, 7):
            data[i] = 0xAA
    db.write_bytes(bytes(data))
    proc = demo.doit("sample:demo", build="rebuilt")
    out = _out(proc)
    assert "Traceback" not in out and "moved it to doit.sqlite3.damaged" in out
    assert (demo.root / "cache/doit.sqlite3.damaged").is_file()
    reports = [demo.report(s) for s in ("resize", "bucket", "latents", "textemb", "train", "sample")]
    assert all(r["computed"] == 0 for r in reports)  # the manifests and entries held the truth
    outcome(out, clear=True)
    demo.doit("sample:demo", build="then")
    assert demo.ran("then") == set()


def test_ctrl_c_during_training_names_the_kept_state_and_the_next_run_resumes_exactly(demo, built_demo):
    _forget_later_epochs(demo)
    demo.edit(lambda d: d["train"].update(epochs=4))  # from the epoch-1 state on: epochs 2-4 train
    states = lambda: set(glob.glob(str(demo.root / "cache/objects/train/*/*.pt")))  # noqa: E731
    before = states()
    # started as a terminal starts a foreground job: SIGINT at its default, whatever the suite's own
    # process inherited (a suite run in the background by a script has SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", "doit", "train:demo"], cwd=demo.root, start_new_session=True,
                            env={**os.environ, "LORABUILD_BUILD": "ctrlc"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not states() - before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in out and "KeyboardInterrupt" not in out
    m = re.search(r"train:demo: stopped; the state after epoch (\d) is kept: run the build again to continue", out)
    assert m, out[-2000:]
    outcome(out, clear=True)
    demo.doit("train:demo", build="again")
    assert f"continued from the training state after epoch {m.group(1)}" in " ".join(demo.report("train")["notes"])
    a = load_file(str(demo.root / "output/demo/demo.safetensors"))
    b = load_file(str(built_demo.root / "output/demo/demo-000004.safetensors"))
    lost = not (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
    outcome("", clear=True, lost=lost)
    assert not lost
    record(f"Ctrl-C during training: one line naming the kept state (epoch {m.group(1)}); the next run continues "
           "from it to the LoRA an uninterrupted run makes")
