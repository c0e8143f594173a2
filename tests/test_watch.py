"""``lorabuild watch`` as a subprocess on a real workspace: one image, a burst, a caption edit,
ignored files, a broken then fixed YAML, and a clean exit on SIGTERM."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sends SIGTERM")


class Watch:
    def __init__(self, ws):
        self.ws = ws
        self.proc = subprocess.Popen([sys.executable, "-m", "lorabuild", "watch", "demo", "--quiet", "0.8"], cwd=ws.root,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 180) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "watch exited:\n" + "\n".join(self.log)
                continue
            self.log.append(line)
            if text in line:
                return line
        raise AssertionError(f"no '{text}' within {timeout}s:\n" + "\n".join(self.log[-40:]))

    def quiet_for(self, seconds: float) -> list[str]:
        """Lines printed during ``seconds`` (to show nothing was built)."""
        end, got = time.monotonic() + seconds, []
        while time.monotonic() < end:
            try:
                got.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                pass
        self.log += got
        return got


def _new_image(src, dst, n: int) -> None:
    """A copy of ``src`` with one pixel changed: new content, so nothing can be reused."""
    img = Image.open(src).convert("RGB")
    img.putpixel((0, 0), (n % 256, 7, 7))
    img.save(dst)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _build_id(line: str) -> str:
    return line.rsplit("[", 1)[1].rstrip("]")


def test_watch_builds_as_files_land(demo):
    w = Watch(demo)
    try:
        w.wait_for("build 1 done")
        w.wait_for("watching demo")
        concept = demo.data / "10_redcircle shape"

        _new_image(concept / "redcircle_00.png", concept / "one.png", 1)
        bid = _build_id(w.wait_for("build 2 done"))
        assert demo.report("latents")["build"] == bid
        assert (demo.report("resize")["computed"], demo.report("latents")["computed"]) == (1, 1)

        for i in range(10):  # a burst: one build
            _new_image(concept / f"redcircle_0{i % 7}.png", concept / f"burst_{i}.png", 100 + i)
        bid = _build_id(w.wait_for("build 3 done"))
        assert demo.report("resize")["computed"] == 10 and demo.report("resize")["build"] == bid
        assert not any("build 4" in line for line in w.quiet_for(3))

        (concept / ".hidden.png").write_bytes(b"x")
        (concept / "download.png.part").write_bytes(b"x")
        (concept / "notes.md").write_text("not an image")
        assert not any("build" in line for line in w.quiet_for(3))

        (concept / "redcircle_02.txt").write_text("redcircle, edited by hand\n")
        bid = _build_id(w.wait_for("build 4 done"))
        assert demo.report("textemb")["build"] == bid and demo.report("textemb")["computed"] == 1
        assert demo.report("latents")["build"] != bid  # a caption edit re-runs only the text side

        good = demo.yaml_path.read_text()
        demo.yaml_path.write_text(good.replace("batch_size: 4", "batch_size: -1"))
        w.wait_for("train.batch_size: -1 is less than the minimum of 1")
        w.wait_for("not building until it is fixed")
        demo.yaml_path.write_text(good.replace("max_side: 256", "max_side: 192"))
        bid = _build_id(w.wait_for("build 5 done"))
        assert demo.report("resize")["build"] == bid

        if os.path.exists(f"/proc/{w.proc.pid}/stat"):  # idle: no polling loop burning CPU
            before = _cpu_seconds(w.proc.pid)
            w.quiet_for(3)
            assert _cpu_seconds(w.proc.pid) - before < 0.15
    finally:
        w.proc.send_signal(signal.SIGTERM)
        rc = w.proc.wait(timeout=120)
    w.wait_for("watch: stopped", timeout=10)
    assert rc == 0
