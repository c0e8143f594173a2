"""Copy finished cache entries into ``output/``, where another program may hold them open.

ComfyUI, A1111 and Forge memory-map a loaded LoRA; on Windows ``os.replace`` onto a mapped file,
or ``unlink`` of it, fails with ``PermissionError`` for as long as the UI keeps it
(safetensors#164, #574). So a file whose bytes would not change is left alone, and a locked one
is not fatal: the new bytes go beside it as ``<stem>.new<suffix>`` with a warning naming both
paths. The entry stays in the cache, and the pending ``.new`` file makes the stage's doit task
out of date (:func:`pending`), so the next build publishes normally once the UI lets go.
No torch here: :func:`up_to_date` runs when doit checks the task graph.

A train run's files (:class:`Exporter`, :func:`export_missing`, :func:`publish_run`): written into
the cache in the output precision with kohya's ``ss_*`` metadata, written again from the
full-precision states when only output settings changed, then published here with the loss logs.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sys
import time
import uuid
from functools import cached_property
from pathlib import Path

from ..cache import atomic_path, atomic_write, checked_read, key_hash
from ..families import Family, family
from .plan import RunPlan, ema_key, entry_key

HINT = "close the LoRA in the UI that loaded it (or restart the UI) and build again"


def side_path(dst: Path) -> Path:
    """Where the new bytes go while ``dst`` is locked: ``demo.safetensors`` -> ``demo.new.safetensors``."""
    return dst.with_name(f"{dst.stem}.new{dst.suffix}")


def same_bytes(src: Path, dst: Path, hashes=None) -> bool:
    """True when ``dst`` already holds ``src``'s bytes: sizes first, then sha256 (memoised by
    ``hashes``, a :class:`~lorabuild.cache.FileHashes`, so an unchanged pair is not re-read)."""
    try:
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            return False
        if hashes is not None:
            return hashes.sha256(dst) == hashes.sha256(src)
        with open(src, "rb") as a, open(dst, "rb") as b:
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def _warn(notes: list | None, text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)
    if notes is not None:
        notes.append(text)


def publish(src: Path, dst: Path, hashes=None, notes: list | None = None, write=None) -> Path:
    """Put ``src``'s bytes at ``dst`` (or, with ``write(tmp)``, what it writes) and return the
    path that holds them: ``dst``, or its side file when ``dst`` is locked."""
    dst = Path(dst)
    side = side_path(dst)
    if write is None and same_bytes(Path(src), dst, hashes):
        remove(side, None)
        return dst
    write = write or (lambda tmp: shutil.copyfile(src, tmp))
    try:
        with atomic_path(dst) as tmp:
            write(tmp)
    except PermissionError as exc:
        try:
            with atomic_path(side) as tmp:
                write(tmp)
        except PermissionError:
            _warn(notes, f"{dst} and {side} are both open in another program ({exc.strerror}); "
                         f"they were left as they were, and the new file is kept in the cache: {HINT}")
            return dst
        _warn(notes, f"{dst} is open in another program ({exc.strerror}), so the new file was written "
                     f"beside it as {side}: {HINT}, and it replaces {dst.name}")
        return side
    remove(side, None)
    return dst


def remove(path: Path, notes: list | None = None) -> bool:
    """Delete ``path`` if it exists; a locked one is kept with a warning (pruning never fails a build)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        _warn(notes, f"{path} is open in another program ({exc.strerror}) and was not deleted; "
                     "delete it yourself once the program lets it go")
        return False


def pending(folder: Path, pattern: str = "*") -> list[Path]:
    """The side files a locked publish left in ``folder`` (``pattern`` narrows them to one output)."""
    with contextlib.suppress(OSError):
        return sorted(p for p in Path(folder).glob(f"{pattern}.new.*") if p.is_file())
    return []


def up_to_date(folder: str, pattern: str = "*") -> bool:
    """doit ``uptodate`` item: out of date while a locked publish is waiting to be redone."""
    return not pending(Path(folder), pattern)


# --- a train run's files ---

def _bucket_info(lat_items: list[dict]) -> dict:
    counts: dict[tuple, int] = {}
    for e in lat_items:
        counts[tuple(e["bucket"])] = counts.get(tuple(e["bucket"]), 0) + 1
    return {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))}}


def run_metadata(project, inp, rp: RunPlan) -> dict:
    """The arguments of :func:`~lorabuild.lora.metadata.kohya_metadata` that every file of the run
    shares (all but epoch, step and stamps); ``inp``: the run's ``RunInputs``."""
    from .. import models, multires
    from ..lora.metadata import tag_frequency

    p = project
    # the metadata describes what was trained: validation images are left out of it
    val_ids = {s.id for s in inp.val_samples}
    # an image trained at several resolutions counts once in the folders' counts and tags (kohya: once per folder)
    again = val_ids | {e["id"] for e in inp.lat_manifest["items"] if e.get("image")}
    trained_captions = {i: c for i, c in inp.captions.items() if i not in again}
    folder_of = {im.id: im.concept.folder.name for im in inp.dataset.images}
    dirs = {}
    for im in inp.dataset.images:
        if im.id in again:
            continue
        d = dirs.setdefault(im.concept.folder.name, {"n_repeats": im.concept.repeats, "img_count": 0})
        d["img_count"] += 1
    cfg = {s: p.section(s) for s in ("network", "train", "captions", "textemb", "latents", "output")}
    cfg["bucket"] = rp.wkey["params"]["bucket"]  # what the key holds, so a restored file never states other settings
    return dict(
        cfg=cfg, output_name=p.output_name, arch=inp.info["arch"], prediction_type=inp.info["prediction_type"],
        plan=rp.plan, dataset_dirs=dirs, tag_freq=tag_frequency(trained_captions, folder_of),
        bucket_info=_bucket_info([e for e in inp.lat_manifest["items"] if e["id"] not in val_ids]),
        textemb_cached=inp.cached, model_name=Path(str(p.get("base_model"))).name, model_hash=inp.unet_id,
        model_source=models.source_info(inp.mdir),
        datasets=multires.datasets_metadata([e for e in inp.lat_manifest["items"] if e["id"] not in val_ids], cfg["bucket"]),
    )


class Exporter:
    """Writes a run's saved files into the train store: kohya's layout, the output precision and
    the ``ss_*`` metadata of the epoch/step each holds."""

    def __init__(self, ctx, store, inp, rp: RunPlan):
        self.ctx, self.store, self.inp, self.rp = ctx, store, inp, rp

    @cached_property
    def _shared(self) -> dict:  # read once, at the first file written
        return run_metadata(self.ctx.project, self.inp, self.rp)

    def metadata(self, epoch: int, step: int, stamp: dict, ema: bool = False) -> dict:
        """kohya's ``ss_*`` metadata of the file saved after ``epoch``/``step`` (its EMA file's, ``ema``)."""
        from . import ema as ema_settings
        from ..lora.metadata import kohya_metadata

        md = kohya_metadata(**self._shared, epoch=epoch, step=step, session_id=stamp["session"],
                            started=stamp["started"], finished=stamp["finished"])
        if ema:
            md.update(ema_settings.metadata(self.ctx.project.get("train.ema")))
        if self.inp.info.get("zero_terminal_snr"):  # the base model's own schedule (a ztsnr checkpoint) was rescaled
            md["ss_zero_terminal_snr"] = "True"
        fam = self._family()
        if type(fam).model_metadata is not Family.model_metadata:  # SD 3.5: Large or Medium; FLUX.1 dev or schnell
            md.update(fam.model_metadata(self._denoiser_config(fam)))
        return md

    def _family(self) -> Family:
        return family(self.inp.info["arch"])

    def _denoiser_config(self, fam) -> dict:
        from .. import models

        return models.read_config(self.inp.mdir, fam.denoiser_part)

    def _layout(self, tensors: dict) -> dict:
        """The family's file layout of the trained tensors (FLUX: BFL's names, q/k/v fused), or PEFT's
        with ``output.format: diffusers`` (what diffusers' load_lora_weights reads for SD 3.5 and FLUX.1)."""
        fam = self._family()
        if self.ctx.project.get("output.format") == "diffusers":
            return fam.peft_layout(tensors, self._denoiser_config(fam))
        if type(fam).saved_layout is Family.saved_layout:  # SD: the trained names are the file's (no config read)
            return tensors
        return fam.saved_layout(tensors, self._denoiser_config(fam))

    def export(self, tensors: dict, ekey: dict, epoch: int, step: int, stamp: dict, ema: bool = False) -> str:
        """Save saved-layout ``tensors`` as the entry ``ekey`` in the output precision, with the
        metadata of ``epoch``/``step`` (and of train.ema, ``ema``); ``stamp``: the run's session id and times."""
        import torch

        from ..lora.network import write_kohya

        self.ctx.check_inputs()  # the UNet and text encoder trained on are those the key names
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            self.ctx.project.get("output.save_precision")]
        tensors = self._layout(tensors)
        with self.store.put(key_hash(ekey), ekey, {"epoch": epoch, "step": step}) as tmp:
            write_kohya(tensors, tmp, dtype, self.metadata(epoch, step, stamp, ema))
        return key_hash(ekey)


def export_missing(ex: Exporter, states, e0: int, whole) -> int:
    """Write each saved file up to epoch ``e0`` (saved epochs, snapshots) that the store lacks from
    the full-precision weights kept beside it in ``states``: what a change of ``output.save_precision``
    or the metadata leaves to do. Returns how many were written; nothing is trained."""
    import torch

    from ..lora.network import ema_weights, kohya_tensors

    rp, store = ex.rp, ex.store
    todo = [(entry_key(rp.wkey, rp.plan, "epoch", e), rp.state_hash(e), False) for e in sorted(rp.saved)
            if e <= e0 and not whole(store, rp.epoch_hash(e))]
    if rp.with_ema:  # the EMA files, from the averaged weights in the same states
        todo += [(ema_key(rp.wkey, rp.plan, e), rp.state_hash(e), True) for e in sorted(rp.saved)
                 if e <= e0 and not whole(store, rp.ema_hash(e))]
    todo += [({**rp.wkey, "snapshot": row}, rp.full_hash(row), False) for row, (_, step) in rp.snapshot_points.items()
             if step <= rp.plan.epoch_end_step(e0) and not whole(store, rp.snap_hash(row))]
    for ekey, fh, ema in todo:
        full = checked_read("train", states.path(fh), lambda f: torch.load(f, weights_only=True))
        info = states.info(fh) or {}
        if ema:
            full, info = ema_weights(full), {**info, **info.get("ema_stamp", {})}
        # the stamp of the run that trained them, so only what changed differs from its files
        stamp = {k: info.get(k, now) for k, now in (("session", uuid.uuid4().hex), ("started", time.time()),
                                                    ("finished", time.time()))}
        ex.export(kohya_tensors(full), ekey, info["epoch"], info["step"], stamp, ema=ema)
        whole.seen(store, key_hash(ekey))
    return len(todo)


def run_files(entry: dict, name: str, emas: list, ema_only: bool, step_saves: dict,
              keep_last: int | None) -> tuple[dict, list]:
    """({file name: entry hash} of the files a run publishes beside ``<name>.safetensors``, [step, hash]
    of its step saves): every saved epoch as ``<name>-000001``, with train.ema its EMA files
    (``<name>-ema[-000001]``) beside them or (``ema_only``) in their place, the step saves as
    ``<name>-step00000500``; with ``keep_last`` the last N of each (kohya save_last_n_epochs)."""
    final_epoch = entry["epochs"][-1][0]

    def per_epoch(rows: list, stem: str) -> dict:
        files = {f"{stem}-{e:06d}.safetensors": eh for e, eh, *_ in rows if e != final_epoch}
        if keep_last:  # the final LoRA counts as one of the last N
            files = dict(sorted(files.items())[-(keep_last - 1):]) if keep_last > 1 else {}
        return files

    wanted = per_epoch(emas if ema_only else entry["epochs"], name)
    if emas and not ema_only:
        wanted.update({f"{name}-ema.safetensors": emas[-1][1], **per_epoch(emas, f"{name}-ema")})
    steps = [[st, sh] for row_id, _, st, sh in entry.get("snapshots", []) if row_id in step_saves]
    step_files = {f"{name}-step{st:08d}.safetensors": sh for st, sh in steps}
    if keep_last:
        step_files = dict(sorted(step_files.items())[-keep_last:])
    wanted.update(step_files)
    return wanted, steps


def publish_run(store, final: str, wanted: dict, out_dir: Path, name: str, hashes, notes: list) -> None:
    """Publish the entry ``final`` as ``<name>.safetensors`` and ``wanted`` (:func:`run_files`) beside
    it; remove the run's files (and pending side files) no longer wanted."""
    publish(store.path(final), out_dir / f"{name}.safetensors", hashes, notes)
    for pattern in ("[0-9]" * 6, "step" + "[0-9]" * 8, "ema", "ema-" + "[0-9]" * 6):
        for old in out_dir.glob(f"{name}-{pattern}.safetensors"):
            if old.name not in wanted:
                remove(old, notes)  # a locked one is kept, with a warning
    for side in pending(out_dir, f"{name}*"):  # a locked publish of a file no longer wanted
        if side.name.replace(".new.", ".") not in wanted and side.name != f"{name}.new.safetensors":
            remove(side, notes)
    for fname, eh in wanted.items():
        publish(store.path(eh), out_dir / fname, hashes, notes)


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())


def write_logs(out_dir: Path, name: str, entry: dict) -> None:
    """loss.csv, val_loss.csv (validation, when the run measured it) and loss.png of a run's entry."""
    # with train.scale_weight_norms each row also holds kohya's max-norm logs (train.loop.MAX_NORM_LOGS)
    rows = entry.get("loss", [])
    extra = ["keys_scaled", "average_key_norm", "max_key_norm"] if rows and len(rows[0]) > 5 else []
    _write_csv(out_dir / "loss.csv", ["step", "epoch", "loss", "lr", "seconds"] + extra, rows)
    val_csv = out_dir / "val_loss.csv"
    if entry.get("val"):
        _write_csv(val_csv, ["epoch", "step", "val_loss"], entry["val"])
    elif val_csv.exists():
        val_csv.unlink()
    if entry.get("loss"):
        from .lossplot import loss_plot

        loss_plot(entry["loss"], out_dir / "loss.png", f"{name}: loss and learning rate", entry.get("val"))
