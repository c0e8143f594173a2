"""Content-addressed cache: canonical keys, atomic writes, entries with a key sidecar.

Layout under ``cache/`` (the workspace's cache root)::

    objects/<stage>/<ab>/<cd…>.<ext>        an entry (one item's artifact)
    objects/<stage>/<ab>/<cd…>.json         its sidecar: {"key": {...}, "info": {...}, "sum": "blake2b:…"}
    manifests/<project>/<stage>.json        which entries a project's stage uses
    reports/<project>/<stage>.json          what the last run of that stage did
    hashes.json                             sha256 memo keyed by path+size+mtime

Conventions follow pip's ``_hash_dict`` (sha of canonical JSON over a small named
dict) and joblib's ``concurrency_safe_write`` (temp file beside the target, renamed).
No torch here: this module is imported when doit loads the task graph.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal dicts give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def without_newer(section: dict, off: dict) -> dict:
    """``section`` as a cache key holds it: each field of ``off`` (options added after keys were
    first made) dropped while it has the value that leaves training as it was, so projects
    that do not use them keep their keys (and their trained LoRAs)."""
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (YAML lists vs frozen tuples)
    return {k: v for k, v in section.items() if not (k in off and plain(v) == off[k])}


def key_hash(key: dict) -> str:
    """sha256 hex of a key dict's canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode("ascii")).hexdigest()


def _replace(src: str, dst: str) -> None:
    # Windows refuses os.replace while another process has dst open (a reader,
    # an antivirus scan); pip retries for about a second, and so do we.
    for attempt in range(10):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == 9:
                raise
            time.sleep(0.1)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_errno(exc: BaseException | None) -> int | None:
    """The errno if ``exc`` says the disk (or quota, or file size limit) is full. Writers in
    other languages (safetensors' Rust) report it only in their message: ``(os error 28)``;
    torch.save raises ``RuntimeError: unexpected pos …`` with the OSError as its context."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc.errno
        m = re.search(r"os error (\d+)", str(exc))
        if m and int(m.group(1)) in DISK_FULL:
            return int(m.group(1))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends it is fsynced and renamed onto it.

    A process killed mid-write leaves at most a ``.*.tmp-*`` file, never a partial
    target. For writers that want a file name (safetensors, PIL). A full disk is an
    OSError naming ``path``, with ``need``: the bytes the file needs (when the writer
    knows them), else what was written before the disk filled (``need_at_least``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # short (Windows' 260-character MAX_PATH counts the whole path); the pid lets `lorabuild gc`
    # tell a live writer's file from a killed one's, the uuid keeps threads apart
    tmp = path.with_name(f".{path.stem[:8]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _replace(str(tmp), str(path))
    except Exception as exc:
        code = disk_full_errno(exc)
        if code:
            full = OSError(code, os.strerror(code), str(path))  # name the file being written
            with contextlib.suppress(OSError):
                full.need_at_least = tmp.stat().st_size
            full.need = need
            raise full from exc
        raise
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", need: int | None = None) -> Iterator[Any]:
    """Write ``path`` all-or-nothing through an open file; ``mode`` is ``"wb"`` or ``"w"`` (UTF-8)."""
    kwargs = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
    with atomic_path(path, need) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


def dumps(obj: Any) -> str:
    """JSON for the files lorabuild writes (manifests, reports, hash memo): a dict's keys one per
    line, and a list value one element per line, each element compact. Readable and diff-friendly
    (an added image is one added line) and written by json's C encoder: ``indent`` switches
    to the pure-Python one, which took a tenth of a second per 1,000-image manifest."""
    if not isinstance(obj, dict) or not obj:
        return _ENCODER.encode(obj) + "\n"
    lines = []
    for k in sorted(obj):
        v = obj[k]
        if isinstance(v, list) and v:
            lines.append(f" {_ENCODER.encode(k)}: [\n  " + ",\n  ".join(map(_ENCODER.encode, v)) + "\n ]")
        else:
            lines.append(f" {_ENCODER.encode(k)}: {_ENCODER.encode(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = dumps(obj)
    with atomic_write(path, "w", need=len(text.encode("utf-8"))) as fh:
        fh.write(text)


def write_json_if_changed(path: str | os.PathLike, obj: Any) -> bool:
    """Write only when the content differs, so doit's file checks see no change."""
    path = Path(path)
    text = dumps(obj)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return True


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Read JSON; a missing or unreadable file gives ``default`` (a miss, not a crash)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


class CorruptEntry(Exception):
    """A cache entry that exists but cannot be read (truncated, damaged on disk)."""

    def __init__(self, stage: str, path: Path, reason: str):
        super().__init__(f"{stage} cache entry {path} is unreadable ({reason})")
        self.stage, self.path, self.reason = stage, Path(path), reason


def checked_read(stage: str, path: str | os.PathLike, reader):
    """``reader(path)``, with any failure turned into :class:`CorruptEntry` naming the entry."""
    try:
        return reader(path)
    except Exception as exc:  # noqa: BLE001 - whatever the format library raises
        raise CorruptEntry(stage, Path(path), f"{type(exc).__name__}: {exc}") from None


def bytes_sum(data: bytes) -> str:
    """The checksum a sidecar keeps of its entry's bytes: blake2b, several times faster than sha256
    here, and only there to notice damage, not to name content."""
    return "blake2b:" + hashlib.blake2b(data, digest_size=20).hexdigest()


def file_sum(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return "blake2b:" + hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=20)).hexdigest()


class Store:
    """The content-addressed entries of one stage under ``cache/objects/<stage>/``."""

    def __init__(self, cache_root: str | os.PathLike, stage: str, ext: str):
        self.root = Path(cache_root) / "objects" / stage
        self._root = str(self.root)
        self.stage = stage
        self.ext = ext

    def path(self, h: str) -> Path:
        return self.root / h[:2] / f"{h[2:]}{self.ext}"

    def sidecar(self, h: str) -> Path:
        return self.root / h[:2] / f"{h[2:]}.json"

    def has(self, h: str) -> bool:
        # strings, not Paths: a build asks this once per item of every stage
        base = f"{self._root}{os.sep}{h[:2]}{os.sep}{h[2:]}"
        return os.path.isfile(base + self.ext) and os.path.isfile(base + ".json")

    def info(self, h: str) -> dict | None:
        """The ``info`` dict stored beside an entry, or None when the entry is missing."""
        if not self.path(h).is_file():
            return None
        side = read_json(self.sidecar(h))
        return side.get("info") if isinstance(side, dict) else None

    def discard(self, h: str, reason: str) -> None:
        """Drop an unreadable entry so it is recomputed (dvc's ``_load_cache`` does the same)."""
        print(f"lorabuild: {self.stage} cache entry {self.path(h)} is unreadable ({reason}); recomputing", flush=True)
        self.remove(h)

    def _damage(self, h: str, data: bytes | None = None) -> str | None:
        """Why an entry's bytes are not those its sidecar's checksum recorded, or None when they are
        (or when the entry predates checksums: nothing to compare with)."""
        side = read_json(self.sidecar(h))
        want = side.get("sum") if isinstance(side, dict) else None
        if not want:
            return None if isinstance(side, dict) else "missing sidecar"
        try:
            got = bytes_sum(data) if data is not None else file_sum(self.path(h))
        except OSError as exc:
            return f"cannot be read: {exc.strerror}"
        return None if got == want else "checksum mismatch: its bytes changed after it was stored"

    def verified(self, h: str) -> bool:
        """Whether the entry is present and whole. A damaged one (a flipped byte on disk, a sidecar
        gone) is reported once, removed and so a miss: the stage that reads it recomputes it."""
        if not self.has(h):
            return False
        problem = self._damage(h)
        if problem:
            self.discard(h, problem)
            return False
        return True

    def read_verified(self, h: str) -> bytes:
        """The entry's bytes, checked against its checksum (read once: what is checked is what is
        used). A damaged entry raises :class:`CorruptEntry`."""
        path = self.path(h)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptEntry(self.stage, path, f"cannot be read: {exc.strerror}") from None
        problem = self._damage(h, data)
        if problem:
            raise CorruptEntry(self.stage, path, problem)
        return data

    def remove(self, h: str) -> None:
        for p in (self.path(h), self.sidecar(h)):
            with contextlib.suppress(OSError):
                p.unlink()

    @contextlib.contextmanager
    def put(self, h: str, key: dict, info: dict | None = None, need: int | None = None) -> Iterator[Path]:
        """Yield a temp path to write the entry to; it becomes visible only when complete.

        The sidecar, with the checksum of the finished bytes, is written before the data is
        renamed into place, so "data file exists" means the entry is whole and checkable.
        """
        with atomic_path(self.path(h), need) as tmp:
            yield tmp
            write_json(self.sidecar(h), {"key": key, "info": info or {}, "sum": file_sum(tmp)})


    def lock_path(self, h: str) -> Path:
        # 4,096 lock files per stage at most: two keys share one only by their first 3 hex digits
        return self.root.parent.parent / "locks" / "objects" / self.stage / f"{h[:3]}.lock"

    @contextlib.contextmanager
    def claim(self, hashes: list[str]) -> Iterator[set[str]]:
        """Lock these keys against other processes and yield the ones still missing.

        Two builds that share an entry (``doit -n 2`` over projects with the same images)
        would otherwise both find it missing and both compute it; with the claim the second
        waits for the first and then finds it present. Locks are taken in sorted order, so
        two claims over overlapping keys cannot deadlock. Writes stay atomic either way: the
        lock only saves the duplicate work.
        """
        from filelock import FileLock

        stripes = sorted({self.lock_path(h) for h in hashes})
        with contextlib.ExitStack() as stack:
            for path in stripes:
                path.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(FileLock(str(path)))
            yield {h for h in hashes if not self.has(h)}


class FileChanged(Exception):
    """A file kept changing while it was read (a writer at work): no consistent bytes to key on."""

    def __init__(self, path):
        super().__init__(f"{path} kept changing while it was read; run the build again once it is written")
        self.path = path


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


class FileHashes:
    """sha256 of files, remembered by (path, size, mtime_ns) so unchanged files are not re-read.

    As make and rsync, a file rewritten with the same size and mtime keeps its remembered
    digest; :meth:`forget` (``lorabuild status NAME --rehash``) makes the next build re-read it.
    ``observed`` collects the (size, mtime_ns) each digest was taken at, so a stage can check
    that what it loaded later is still that file (:func:`changed_since`).
    """

    def __init__(self, memo_path: str | os.PathLike, observed: dict | None = None):
        self.memo_path = Path(memo_path)
        self._memo: dict[str, list] = read_json(self.memo_path, {}) or {}
        self._dirty = False
        self.observed = {} if observed is None else observed

    def sha256(self, path: str | os.PathLike, tensors_only: bool = False) -> str:
        """sha256 of the file; with ``tensors_only``, of a safetensors file's tensor bytes alone
        (its JSON header, which holds the metadata, skipped), so equal weights hash equal."""
        p = os.path.abspath(path)
        st = os.stat(p)
        memo_key = p + ("#tensors" if tensors_only else "")
        hit = self._memo.get(memo_key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            self.observed[p] = _stamp(st)
            return hit[2]
        for _ in range(5):  # the size+mtime remembered must be those of the bytes hashed
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                if tensors_only:
                    header_len = int.from_bytes(fh.read(8), "little")
                    fh.seek(8 + header_len)
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            after = os.stat(p)
            if _stamp(after) == _stamp(st):
                break
            st = after
        else:
            raise FileChanged(p)
        digest = h.hexdigest()
        self._remember(memo_key, st, digest)
        return digest

    def read(self, path: str | os.PathLike) -> tuple[bytes, str]:
        """(bytes, their sha256): a file read once, so that what a stage decodes is exactly what
        its key names. A writer replacing the file meanwhile cannot put new pixels under the old
        bytes' key (the memo is updated to what was read)."""
        p = os.path.abspath(path)
        for _ in range(5):
            st = os.stat(p)
            with open(p, "rb") as fh:
                data = fh.read()
            if _stamp(os.stat(p)) == _stamp(st):
                break
        else:
            raise FileChanged(p)
        digest = hashlib.sha256(data).hexdigest()
        self._remember(p, st, digest)
        return data, digest

    def _remember(self, memo_key: str, st: os.stat_result, digest: str) -> None:
        self._memo[memo_key] = [st.st_size, st.st_mtime_ns, digest]
        self.observed[memo_key.split("#", 1)[0]] = _stamp(st)
        self._dirty = True

    def forget(self, paths) -> int:
        """Drop the remembered digests of ``paths`` (both kinds); returns how many were dropped."""
        dropped = 0
        for path in paths:
            p = os.path.abspath(path)
            for memo_key in (p, p + "#tensors"):
                if self._memo.pop(memo_key, None) is not None:
                    dropped += 1
        if dropped:
            # written whole (no merge with what is on disk, which would bring the entries back)
            write_json(self.memo_path, self._memo)
        return dropped

    def save(self) -> None:
        if self._dirty:
            # Merge with what other processes wrote meanwhile; the last writer wins per path.
            current = read_json(self.memo_path, {}) or {}
            current.update(self._memo)
            write_json(self.memo_path, current)
            self._dirty = False


def changed_since(observed: dict) -> str | None:
    """The first file of ``observed`` ({path: (size, mtime_ns)}) that is no longer as it was
    when it was hashed (rewritten, or gone), else None."""
    for path, stamp in observed.items():
        try:
            now = _stamp(os.stat(path))
        except OSError:
            return path
        if now != tuple(stamp):
            return path
    return None
