"""The dashboard's build queue: doit targets run one after another, in the workspace.

The queue is ``cache/serve/queue.json`` (rewritten atomically under a file lock), so it
survives a page reload and a server restart; each entry's output goes to
``cache/serve/logs/<id>.log``. Only one server runs the queue of a workspace at a time
(``cache/locks/serve-runner.lock``); a second one shows it. A build is the same
``python -m doit TARGET`` a user types, so it takes the CLI's project locks.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from ..cache import read_json, write_json
from ..faults import STOPPABLE

TARGET = re.compile(r"^(resize|tag|bucket|latents|textemb|train|sample):([A-Za-z0-9][A-Za-z0-9_.-]*)$")
STOP_GRACE = 30.0  # seconds between Ctrl-C and a hard kill: enough to finish writing a file
KEPT = "the training state of the last finished epoch is kept in the cache: start train again to continue from it"


class QueueError(Exception):
    pass


class BuildQueue:
    def __init__(self, root: Path, run: bool = True):
        self.root = Path(root)
        self.path = self.root / "cache" / "serve" / "queue.json"
        self.logs = self.root / "cache" / "serve" / "logs"
        self._proc: subprocess.Popen | None = None
        self._running_id: str | None = None
        self._stop_asked: set[str] = set()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lorabuild-queue") if run else None

    # --- the file ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _edit(self):
        from filelock import FileLock

        with FileLock(str(self.root / "cache" / "locks" / "serve-queue.lock")):
            entries = self.entries()
            yield entries
            write_json(self.path, {"entries": entries})

    def entries(self) -> list[dict]:
        data = read_json(self.path, {}) or {}
        return data.get("entries", []) if isinstance(data, dict) else []

    def add(self, target: str) -> dict:
        m = TARGET.match(target or "")
        if not m:
            raise QueueError(f"not a build target: {target!r} (stage:project, e.g. train:demo)")
        if not (self.root / "projects" / f"{m.group(2)}.yaml").is_file():
            raise QueueError(f"no project projects/{m.group(2)}.yaml")
        entry = {"id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", "target": target,
                 "state": "pending", "added": time.time(), "started": None, "ended": None, "rc": None, "note": ""}
        with self._edit() as entries:
            entries.append(entry)
        return entry

    def _set(self, entry_id: str, **changes) -> None:
        with self._edit() as entries:
            for e in entries:
                if e["id"] == entry_id:
                    e.update(changes)

    def stop(self, entry_id: str) -> str:
        """Cancel a pending entry, or stop the running one cleanly (Ctrl-C, as in a terminal)."""
        entry = next((e for e in self.entries() if e["id"] == entry_id), None)
        if entry is None:
            raise QueueError(f"no queue entry {entry_id}")
        if entry["state"] == "pending":
            self._set(entry_id, state="cancelled", ended=time.time())
            return "cancelled"
        if entry["state"] != "running" or entry_id != self._running_id or self._proc is None:
            raise QueueError(f"{entry['target']} is {entry['state']}, not running here")
        self._stop_asked.add(entry_id)
        _interrupt(self._proc)
        return "stopping"

    def log(self, entry_id: str, limit: int = 200_000) -> str:
        path = self.logs / f"{entry_id}.log"
        if not re.fullmatch(r"[0-9A-Za-z-]+", entry_id) or not path.is_file():
            return ""
        data = path.read_bytes()[-limit:].decode("utf-8", "replace")
        # tqdm redraws its bar with \r: keep the last drawing of each line
        return "\n".join(line.rsplit("\r", 1)[-1] for line in data.split("\n"))

    # --- the runner ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            self._thread.start()

    def shutdown(self) -> None:
        self._halt.set()
        if self._proc is not None and self._proc.poll() is None:
            self._stop_asked.add(self._running_id)
            _interrupt(self._proc)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=STOP_GRACE + 5)

    def _loop(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.root / "cache" / "locks" / "serve-runner.lock"))
        while not self._halt.is_set():
            try:
                lock.acquire(timeout=0)
            except Timeout:  # another server runs this workspace's queue; this one only shows it
                self._halt.wait(2.0)
                continue
            try:
                self._orphans()
                while not self._halt.is_set():
                    nxt = next((e for e in self.entries() if e["state"] == "pending"), None)
                    if nxt is None:
                        self._halt.wait(0.5)
                        continue
                    self._run(nxt)
            finally:
                lock.release()

    def _orphans(self) -> None:
        """Entries left "running" by a server that stopped (it owned the runner lock, now ours)."""
        with self._edit() as entries:
            for e in entries:
                if e["state"] == "running":
                    e.update(state="failed", ended=time.time(), note="the server stopped while this build ran; " + KEPT)

    def _run(self, entry: dict) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "LORABUILD_BUILD"} | {"PYTHONUNBUFFERED": "1", STOPPABLE: "1"}
        started = time.time()
        self._set(entry["id"], state="running", started=started)
        # the log is appended as the build prints (a log, not a result: no atomic rewrite)
        with open(self.logs / f"{entry['id']}.log", "ab") as log:
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else \
                {"start_new_session": True}  # its own group: Stop reaches torchrun's workers too
            self._proc = subprocess.Popen([sys.executable, "-m", "doit", entry["target"]], cwd=self.root, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
            self._running_id = entry["id"]
            rc = self._proc.wait()
        self._proc, self._running_id = None, None
        if entry["id"] in self._stop_asked:
            state, note = "stopped", _kept_note(self.root, entry["target"], started)
        else:
            state, note = ("done", "") if rc == 0 else ("failed", f"doit exited with {rc}: see the log")
        self._set(entry["id"], state=state, ended=time.time(), rc=rc, note=note)


def _interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C to the build's process group, then a kill if it has not ended after STOP_GRACE."""
    try:
        if os.name == "nt":
            proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
    except (OSError, ProcessLookupError):
        return

    def escalate():
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()

    threading.Thread(target=escalate, daemon=True).start()


def _kept_note(root: Path, target: str, started: float) -> str:
    """Which training state survives a stop: the newest one the train stage saved in this run."""
    if not target.startswith("train:"):
        return "stopped; every finished cache entry is kept"
    best = None
    for side in (root / "cache" / "objects" / "train").glob("*/*.json"):
        if side.with_suffix(".pt").is_file() and side.stat().st_mtime >= started:
            info = (read_json(side, {}) or {}).get("info", {})
            # a snapshot's own weights (train.full_weights) are no state to continue from
            if "epoch" in info and "snapshot" not in info and (best is None or info["epoch"] > best):
                best = info["epoch"]
    if best is None:
        return "stopped before the first epoch ended: no training state of this run was saved"
    return f"stopped; the training state of epoch {best} is kept in the cache: start train again to continue from it"
