"""``lorabuild watch NAME``: build as images land, with watchdog events (no polling loop).

A burst of changes (copying in 200 files) becomes one build after a quiet period; a file
still being written is waited for until its size stops changing; hidden, temporary and
unrelated files are ignored; a YAML edit is validated first, and an invalid one is
reported while the watcher keeps running. One build at a time: changes that arrive
during a build trigger exactly one more. Each build is a fresh ``doit`` process, so it
reads the YAML as it is now. Ctrl-C / SIGTERM let the running build finish its current
item (every write is atomic), then exit 0.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..config import check
from ..dataset import IMAGE_EXTENSIONS, dir_path
from ..faults import STOPPABLE

TEMP_SUFFIXES = (".tmp", ".part", ".crdownload", ".swp", ".download", "~")
CHANGES = {"created", "modified", "moved", "deleted", "closed"}  # watchdog event types that change files
POLL = 0.5  # seconds: the longest a wait lasts before Ctrl-C is looked at
UNTIL = {"latents": ("latents", "textemb"), "train": ("train",), "sample": ("sample",)}


class Watcher:
    def __init__(self, root: Path, name: str, until: str = "latents", quiet: float = 1.0):
        self.root, self.name, self.quiet = root, name, quiet
        self.yaml = root / "projects" / f"{name}.yaml"
        self.targets = [f"{t}:{name}" for t in UNTIL[until]]
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.changed: dict[str, float] = {}  # path → time of its last event
        self.builds = 0
        self.proc: subprocess.Popen | None = None
        self.caption_ext = ".txt"

    # --- events --------------------------------------------------------------------
    def relevant(self, path: str) -> bool:
        p = Path(path)
        if any(part.startswith(".") for part in p.parts[-3:]) or p.name.endswith(TEMP_SUFFIXES):
            return False
        if p == self.yaml:
            return True
        return p.suffix.lower() in IMAGE_EXTENSIONS or p.suffix == self.caption_ext

    def on_event(self, event) -> None:
        if getattr(event, "event_type", "") not in CHANGES:
            return  # opened / closed-without-write: the build itself reading files
        paths = [getattr(event, "src_path", ""), getattr(event, "dest_path", "")]
        hits = [p for p in paths if p and not getattr(event, "is_directory", False) and self.relevant(p)]
        if hits:
            with self.lock:
                for p in hits:
                    self.changed[p] = time.monotonic()
            self.wake.set()

    # --- the loop ------------------------------------------------------------------
    def _settled(self) -> bool:
        """Quiet for ``quiet`` seconds, and every changed file's size is stable."""
        with self.lock:
            if not self.changed:
                return False
            last = max(self.changed.values())
            paths = list(self.changed)
        if time.monotonic() - last < self.quiet:
            return False
        sizes = [_size(p) for p in paths]
        time.sleep(min(0.3, self.quiet))
        if sizes != [_size(p) for p in paths]:
            with self.lock:
                for p in paths:
                    self.changed[p] = time.monotonic()
            return False
        return True

    def _valid_yaml(self) -> bool:
        data, problems = check(self.yaml, str(self.yaml))
        for pr in problems:
            print(pr, flush=True)
        if problems:
            print(f"watch: {self.yaml.name} is invalid; not building until it is fixed (still watching)", flush=True)
            return False
        self.caption_ext = data["dataset"]["caption_extension"]
        return True

    def build(self) -> int:
        self.builds += 1
        build_id = f"watch-{os.getpid()}-{self.builds}"
        print(f"watch: build {self.builds} ({' '.join(self.targets)})", flush=True)
        env = {**os.environ, "LORABUILD_BUILD": build_id, STOPPABLE: "1"}  # request_stop's SIGINT must reach it
        self.proc = subprocess.Popen([sys.executable, "-m", "doit", *self.targets], cwd=self.root, env=env)
        while True:  # timed waits: an untimed one cannot be interrupted by Ctrl-C on Windows
            try:
                rc = self.proc.wait(timeout=POLL)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None
        print(f"watch: build {self.builds} {'done' if rc == 0 else f'failed ({rc})'} [{build_id}]", flush=True)
        return rc

    def run(self) -> int:
        from watchdog.observers import Observer

        if not self.yaml.is_file():
            print(f"lorabuild watch: no project {self.yaml}", file=sys.stderr)
            return 1
        if self._valid_yaml():
            self.build()  # bring the caches up to date first
        observer = Observer()
        handler = _Handler(self)
        observer.schedule(handler, str(self.yaml.parent), recursive=False)
        for folder in self._dataset_folders():
            observer.schedule(handler, str(folder), recursive=True)
        observer.start()
        print(f"watch: watching {self.name} (Ctrl-C to stop)", flush=True)
        try:
            while not self.stop.is_set():
                # Sleep until an event arrives, in POLL-second waits: Ctrl-C cannot interrupt an
                # untimed Event.wait on Windows before Python 3.14 (cpython#80116, gh-125541).
                self.wake.wait(timeout=POLL if not self.changed else min(POLL, self.quiet / 2))
                self.wake.clear()
                if self.stop.is_set() or not self._settled():
                    continue
                with self.lock:
                    self.changed.clear()
                if self._valid_yaml():
                    self.build()
        finally:
            observer.stop()
            observer.join()
        print("watch: stopped", flush=True)
        return 0

    def _dataset_folders(self) -> list[Path]:
        data, problems = check(self.yaml, str(self.yaml))
        if problems:
            return [self.yaml.parent]
        base = self.yaml.parent
        folders = [base / dir_path(d) for d in data["dataset"]["dirs"] + data["dataset"]["reg_dirs"] + data["dataset"]["val_dirs"]]
        folders += [base / c["path"] for c in data["dataset"]["concepts"]]
        return [f.resolve() for f in folders if f.is_dir()]

    def request_stop(self, *_args) -> None:
        self.stop.set()
        self.wake.set()
        if self.proc is not None and self.proc.poll() is None:
            if sys.platform == "win32":
                # Popen.send_signal takes no SIGINT there; the console's Ctrl-C reached doit already
                # (same console), and a SIGTERM to watch ends it once the build has finished
                return
            self.proc.send_signal(signal.SIGINT)  # doit finishes its current item and saves its state


class _Handler:
    """watchdog handler: every event goes to the watcher's filter."""

    def __init__(self, watcher: Watcher):
        self.watcher = watcher

    def dispatch(self, event) -> None:
        self.watcher.on_event(event)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def cmd_watch(root: Path, name: str, until: str, quiet: float) -> int:
    w = Watcher(root, name, until, quiet)
    signal.signal(signal.SIGINT, w.request_stop)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, w.request_stop)
    return w.run()
