"""Faults of the machine and the user, each as one clear line instead of a traceback.

A full disk, a read-only or missing folder, ``cache/`` that is a file, a damaged doit
database, Ctrl-C: none of them loses anything (entries are written atomically and each
stage's manifest, not doit's database, holds what was built), so each needs a line that
says what happened and that the next build continues.
"""
from __future__ import annotations

import atexit
import errno
import os
import shutil
import signal
import sys
from pathlib import Path

from .cache import disk_full_errno
from .workspace import Workspace


class WorkspaceError(Exception):
    """The workspace cannot be used as it is; the message says what to move or fix."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C, after its one line was printed: the process ends without a traceback."""


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _free(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def os_error(label: str, ws: Workspace, exc: OSError) -> str:
    """The one line for an OSError that names a file: a full disk (with what the file needs
    and what is free), a read-only folder, a file where a folder should be."""
    where = ws.relative(Path(exc.filename))
    kept = "everything finished before this is kept"
    if disk_full_errno(exc):
        need, at_least = getattr(exc, "need", None), getattr(exc, "need_at_least", None)
        free = _free(Path(exc.filename).parent)
        size = (f"it needs about {_size(need)}" if need else
                f"it needs more than the {_size(at_least)} written" if at_least else "")
        room = ", ".join(x for x in (size, f"{_size(free)} free there" if free is not None else "") if x)
        return (f"{label}: no space to write {where} ({exc.strerror}{'; ' + room if room else ''}). "
                f"Free some space and run the build again: {kept}.")
    verb = "write" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "use"
    return f"{label}: cannot {verb} {where}: {exc.strerror}. Fix that and run the build again: {kept}."


def stopped(label: str, state_epoch: int | None) -> None:
    """Ctrl-C during a stage: say what is kept, then stop the whole doit run quietly."""
    what = (f"the state after epoch {state_epoch} is kept" if state_epoch
            else "everything finished before this is kept")
    print(f"\n{label}: stopped; {what}: run the build again to continue", file=sys.stderr, flush=True)
    raise Stopped() from None


STOPPABLE = "LORABUILD_STOPPABLE"  # set by the tools that stop a build with SIGINT (serve, watch)


def quiet_interrupts() -> None:
    """A Ctrl-C ends the process with its one line (a stage's :func:`stopped`), not a traceback.

    A process started in the background by a non-interactive shell (``lorabuild serve &``, a
    script, nohup) inherits SIGINT *ignored*, and so does every build it starts: the dashboard's
    Stop and watch's stop would then be ignored until their kill. A build started by one of those
    tools (``LORABUILD_STOPPABLE`` in its environment, in its own process group) takes SIGINT
    again; any other build keeps the shell's choice."""
    sys.excepthook = _excepthook
    if os.environ.get(STOPPABLE) and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _excepthook(kind, value, tb, _default=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        if not isinstance(value, Stopped):
            print("\nlorabuild: stopped", file=sys.stderr)
        return
    _default(kind, value, tb)


def check_workspace(ws: Workspace) -> None:
    """``cache/`` and ``cache/locks`` must be folders; a damaged doit database is moved aside
    (the stages' manifests and entries hold what was built, so doit re-checks each stage and
    recomputes nothing that is cached)."""
    for folder in (ws.cache, ws.cache / "locks"):
        if folder.exists() and not folder.is_dir():
            raise WorkspaceError(f"{folder} is a file, but lorabuild needs a folder there: "
                                 "move the file away and run again")
    try:
        ws.cache.mkdir(exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot make {ws.cache}: {exc.strerror}") from None
    db = ws.cache / "doit.sqlite3"
    problem = _database_problem(db)
    if problem:
        aside = db.with_name(db.name + ".damaged")
        os.replace(db, aside)
        print(f"lorabuild: {db} was unreadable ({problem}); moved it to {aside.name} and started a new one: this "
              "build re-checks every stage, and the caches keep everything computed before", file=sys.stderr)


def _database_problem(db: Path) -> str | None:
    """Why doit could not read its database (None when it can, or when there is none yet)."""
    import sqlite3

    try:
        with open(db, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        return None
    if head and head != b"SQLite format 3\x00":
        return "not an SQLite database"
    if not head:
        return None  # sqlite makes an empty file a new database
    try:
        conn = sqlite3.connect(f"file:{db.as_posix()}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
            conn.execute("select count(*) from sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return None  # locked by another build, say: not damage
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if rows == [("ok",)] else f"integrity check: {rows[0][0]}"


_GUARDED = []


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


def guard_doit_database() -> None:
    """doit writes its database once, when a run ends; on a full disk sqlite's "database or
    disk is full" would end the run in a traceback. Say so in one line instead, and end
    non-zero: nothing is lost but doit's memory of this run (the next build re-checks)."""
    if _GUARDED:
        return
    import sqlite3

    from doit.dependency import SqliteDB

    dump = SqliteDB.dump

    def guarded(self):
        need = sum(len(self.codec.encode(self._cache[t])) for t in self._dirty)  # what this run adds
        try:
            dump(self)
        except sqlite3.Error as exc:
            free = _free(Path(self.name).parent)
            with_room = f"; it needs about {_size(need)}, {_size(free)} free there" if free is not None else ""
            print(f"lorabuild: cannot save doit's record of this build in {self.name} ({exc}{with_room}). "
                  "Nothing built is lost: the next build re-checks the stages against their caches",
                  file=sys.stderr, flush=True)
            atexit.register(_exit_failed)  # doit's own exit status would say all went well
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

    SqliteDB.dump = guarded
    _GUARDED.append(True)
