"""publish.py on files "held open" as Windows holds a LoRA a UI has loaded (tests/winsim.py)."""
from __future__ import annotations

import os

import winsim

from lorabuild import publish
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
