"""train/publish.py on files "held open" as Windows holds a LoRA a UI has loaded (tests/winsim.py)."""
from __future__ import annotations

import os

import winsim

from lorabuild.train import publish
from lorabuild.cache import FileHashes


def _files(tmp_path, old: bytes, new: bytes):
    src, dst = tmp_path / "cache" / "entry.safetensors", tmp_path / "out" / "demo.safetensors"
    src.parent.mkdir()
    dst.parent.mkdir()
    src.write_bytes(new)
    dst.write_bytes(old)
    return src, dst


def test_same_bytes_are_not_rewritten_even_when_held(tmp_path, monkeypatch, capsys):
    src, dst = _files(tmp_path, b"weights" * 100, b"weights" * 100)
    st = dst.stat()
    winsim.install(held=[dst], monkeypatch=monkeypatch)
    hashes = FileHashes(tmp_path / "hashes.json")
    assert publish.publish(src, dst, hashes, notes := []) == dst
    assert (dst.stat().st_ino, dst.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert notes == [] and capsys.readouterr().err == ""
    assert publish.publish(src, dst) == dst  # without a hash memo: compared byte by byte


def test_a_held_output_gets_its_new_bytes_beside_it_then_is_published(tmp_path, monkeypatch, capsys):
    src, dst = _files(tmp_path, b"old" * 100, b"new" * 100)
    side = dst.with_name("demo.new.safetensors")
    with monkeypatch.context() as m:
        winsim.install(held=[dst], monkeypatch=m)
        notes = []
        assert publish.publish(src, dst, FileHashes(tmp_path / "h.json"), notes) == side
        assert dst.read_bytes() == b"old" * 100 and side.read_bytes() == b"new" * 100
        err = capsys.readouterr().err
        assert err.startswith(f"warning: {dst} is open in another program (Access is denied)") and str(side) in err
        assert "close the LoRA in the UI" in err and notes and notes[0] in err
        assert publish.pending(dst.parent) == [side] and not publish.up_to_date(str(dst.parent), "demo*")
        assert not [p for p in os.listdir(dst.parent) if ".tmp-" in p]  # no temp file left
        assert publish.remove(dst) is False and "was not deleted" in capsys.readouterr().err
    assert publish.publish(src, dst) == dst  # the UI let go
    assert dst.read_bytes() == b"new" * 100 and not side.exists()
    assert publish.up_to_date(str(dst.parent), "demo*")


def test_both_held_keeps_everything_and_says_so(tmp_path, monkeypatch, capsys):
    src, dst = _files(tmp_path, b"old", b"new")
    side = publish.side_path(dst)
    side.write_bytes(b"older")
    winsim.install(held=[dst, side], monkeypatch=monkeypatch)
    assert publish.publish(src, dst) == dst
    assert (dst.read_bytes(), side.read_bytes(), src.read_bytes()) == (b"old", b"older", b"new")
    assert "are both open in another program" in capsys.readouterr().err


def test_a_written_output_held_open(tmp_path, monkeypatch):
    dst = tmp_path / "grid.png"
    dst.write_bytes(b"old grid")
    winsim.install(held=[dst], monkeypatch=monkeypatch)
    got = publish.publish(None, dst, write=lambda tmp: tmp.write_bytes(b"new grid"))
    assert got == tmp_path / "grid.new.png" and got.read_bytes() == b"new grid" and dst.read_bytes() == b"old grid"


def _run_entry():
    # a 4-epoch run saving every epoch, step saves at 10 and 30, a sample snapshot at step 5, EMA files
    return {"epochs": [[e, f"e{e}", 10 * e] for e in range(1, 5)],
            "snapshots": [["s000005", "step 5", 5, "snap5"], ["s000010", "step 10", 10, "st10"],
                          ["s000030", "step 30", 30, "st30"]],
            "ema": [[e, f"m{e}", 10 * e] for e in range(1, 5)]}


def test_a_runs_files_by_kohyas_names_with_keep_last_and_ema():
    entry, steps = _run_entry(), {"s000010": ("step 10", 10), "s000030": ("step 30", 30)}
    wanted, rows = publish.run_files(entry, "demo", [], False, steps, None)
    assert wanted == {"demo-000001.safetensors": "e1", "demo-000002.safetensors": "e2", "demo-000003.safetensors": "e3",
                      "demo-step00000010.safetensors": "st10", "demo-step00000030.safetensors": "st30"}
    assert rows == [[10, "st10"], [30, "st30"]]  # the sample snapshot is no step save
    # keep_last 2: the final file counts as one of the epochs, and the last 2 step saves stay
    wanted, _ = publish.run_files(entry, "demo", [], False, steps, 2)
    assert sorted(wanted) == ["demo-000003.safetensors", "demo-step00000010.safetensors", "demo-step00000030.safetensors"]
    # EMA files beside the epochs, or in their place
    wanted, _ = publish.run_files(entry, "demo", entry["ema"], False, {}, 2)
    assert wanted == {"demo-000003.safetensors": "e3", "demo-ema.safetensors": "m4", "demo-ema-000003.safetensors": "m3"}
    wanted, _ = publish.run_files(entry, "demo", entry["ema"], True, {}, 2)
    assert wanted == {"demo-000003.safetensors": "m3"}


def test_publishing_a_run_removes_its_files_no_longer_wanted(tmp_path):
    from lorabuild.cache import Store

    store, out = Store(tmp_path / "cache", "train", ".safetensors"), tmp_path / "out"
    out.mkdir()
    for h in ("final", "e1"):
        with store.put(h * 8, {"h": h}) as tmp:
            tmp.write_bytes(h.encode())
    names = ("demo-000002.safetensors", "demo-step00000010.safetensors", "demo.new.safetensors", "other-000002.safetensors")
    for stale in names:
        (out / stale).write_bytes(b"old")
    (out / "demo-000003.new.safetensors").write_bytes(b"locked once")  # a side file of a file no longer wanted
    notes = []
    publish.publish_run(store, "final" * 8, {"demo-000001.safetensors": "e1" * 8}, out, "demo", None, notes)
    assert sorted(p.name for p in out.iterdir()) == ["demo-000001.safetensors", "demo.safetensors",
                                                     "other-000002.safetensors"]
    assert (out / "demo.safetensors").read_bytes() == b"final"
    assert (out / "demo-000001.safetensors").read_bytes() == b"e1"
    assert notes == []
