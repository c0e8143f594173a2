"""train: cached latents (+ text embeddings) → the LoRA, saved in the kohya/A1111 layout.

Item = one trained LoRA. Its key holds everything that determines the weights: each
image's latent entry, caption and repeats, the network/train/caption settings and the
UNet and text encoder identities. Trained files are content-addressed like any other
entry (DVC calls this a run-cache): going back to a configuration trained before
restores its LoRA instead of training again.
"""
from __future__ import annotations

import csv
import io
import shutil
import time
import uuid
from pathlib import Path

from ..cache import atomic_path, atomic_write, key_hash
from ..captions import concept_options
from ..trainplan import Sample, balance_reg, make_plan
from . import runtime, textemb
from .base import Context, StageError, StageRun

STAGE = "train"
VERSION = 1
SECTIONS = ("network", "train", "captions", "output")
EXTRA_PARAMS = ("textemb.cache", "textemb.clip_skip", "textemb.max_token_length", "latents.flip", "base_model", "dataset")


def run_key(ctx: Context, dataset, captions: dict, latents: dict, te_id: str, unet_id: str, cached: bool) -> dict:
    cfg = {s: ctx.project.section(s) for s in ("network", "train", "captions")}
    cfg["save_precision"] = ctx.project.get("output.save_precision")
    concept_of = {im.id: im.concept for im in dataset.images}
    images = []
    for i in sorted(latents):
        c = concept_of[i]
        # everything per image that shapes training: latent, caption, repeats, reg, caption options
        images.append([i, latents[i]["hash"], captions[i], c.repeats] + ([True] if c.is_reg else [])
                      + ([c.captions] if c.captions else []))
    return {
        "stage": STAGE,
        "v": VERSION,
        "images": images,
        "textemb_max_tokens": ctx.project.get("textemb.max_token_length"),
        "params": cfg,
        "clip_skip": ctx.project.get("textemb.clip_skip"),
        "flip": ctx.project.get("latents.flip"),
        "textemb_cached": cached,
        "unet": unet_id,
        "te": te_id,
    }


def _publish(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _write_loss_csv(path: Path, rows: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "epoch", "loss", "lr", "seconds"])
    w.writerows(rows)
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())


def _bucket_info(lat_items: list[dict]) -> dict:
    counts: dict[tuple, int] = {}
    for e in lat_items:
        counts[tuple(e["bucket"])] = counts.get(tuple(e["bucket"]), 0) + 1
    return {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))}}


def run(ctx: Context, dataset) -> dict:
    from .. import models
    from ..metadata import kohya_metadata, tag_frequency
    from ..plan import build_plan, render
    from ..trainer import TrainInputs, train

    sr = StageRun(ctx, STAGE)
    p = ctx.project
    cached, _ = textemb.project_mode(p)
    captions = textemb.captions_for(ctx, dataset)
    lat_manifest = ctx.read_manifest("latents")
    lat_items = lat_manifest["items"]
    latents = {e["id"]: e for e in lat_items}
    if not set(latents) <= set(captions):
        raise StageError("the latents manifest does not match the dataset: run the latents stage again")
    captions = {i: c for i, c in captions.items() if i in latents}  # images the resize stage skipped drop out
    mdir = runtime.model_dir(ctx)
    info = models.model_info(mdir)
    te_id, unet_id = runtime.identity(ctx, "text_encoder"), runtime.identity(ctx, "unet")
    key = run_key(ctx, dataset, captions, latents, te_id, unet_id, cached)
    h = key_hash(key)
    store = ctx.store(STAGE, ".safetensors")
    name = p.output_name
    out_dir = ctx.ws.output_dir(name)
    entry = store.info(h)

    if entry is None or not all(store.has(eh) for _, eh in entry.get("epochs", [])):
        lat_store = ctx.store("latents", ".safetensors")
        emb_paths = None
        if cached:
            emb_store = ctx.store("textemb", ".safetensors")
            ck = lambda c: textemb.item_key(c, p.get("textemb.clip_skip"), p.get("textemb.max_token_length"), te_id)  # noqa: E731
            emb_paths = {c: emb_store.path(key_hash(ck(c))) for c in set(captions.values())}
            if not all(path.is_file() for path in emb_paths.values()):
                raise StageError("text embeddings are missing from the cache: run the textemb stage again")
        concept_of = {im.id: im.concept for im in dataset.images}
        every = [Sample(i, tuple(latents[i]["bucket"]), concept_of[i].repeats, concept_of[i].is_reg) for i in sorted(latents)]
        samples = [s for s in every if not s.is_reg]
        samples += balance_reg(samples, [s for s in every if s.is_reg])
        plan = make_plan(samples, p.get("train.batch_size"), p.get("train.gradient_accumulation_steps"), p.get("train.epochs"))
        folder_of = {im.id: im.concept.folder.name for im in dataset.images}
        dirs = {}
        for im in dataset.images:
            d = dirs.setdefault(im.concept.folder.name, {"n_repeats": im.concept.repeats, "img_count": 0})
            d["img_count"] += 1
        inp = TrainInputs(
            model_dir=mdir, arch=info["arch"], device=runtime.device(ctx), samples=samples,
            latent_path={i: lat_store.path(latents[i]["hash"]) for i in latents} if lat_manifest.get("cached", True) else None,
            pixels=None if lat_manifest.get("cached", True) else {
                i: (ctx.store("resize", ".png").path(e["src"]), e["resized"]) for i, e in latents.items()},
            caption=captions,
            caption_opts={i: concept_options(p.section("captions"), concept_of[i]) for i in latents},
            embedding_path=emb_paths, cfg={s: p.section(s) for s in ("network", "train", "captions", "textemb", "latents")},
            plan=plan,
        )
        session, started, epochs = uuid.uuid4().hex, time.time(), []
        dtype_name = p.get("output.save_precision")

        def save(network, epoch: int, step: int) -> None:
            import torch

            md = kohya_metadata(
                cfg={s: p.section(s) for s in ("network", "train", "captions", "textemb", "latents", "bucket", "output")},
                output_name=name, arch=info["arch"], prediction_type=info["prediction_type"], plan=plan,
                epoch=epoch, step=step, dataset_dirs=dirs, tag_freq=tag_frequency(captions, folder_of),
                bucket_info=_bucket_info(lat_items), textemb_cached=cached,
                model_name=Path(str(p.get("base_model"))).name, model_hash=unet_id,
                session_id=session, started=started, finished=time.time(),
            )
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
            ekey = {**key, "epoch": epoch}
            with store.put(key_hash(ekey), ekey, {"epoch": epoch, "step": step}) as tmp:
                network.save(tmp, dtype=dtype, metadata=md)
            epochs.append([epoch, key_hash(ekey)])

        print(render(build_plan(p)), flush=True)
        try:
            train(inp, save)
        except FloatingPointError as exc:
            raise StageError(f"train:{ctx.name}: {exc}") from None
        final_hash = epochs[-1][1]
        with store.put(h, key, {"epochs": epochs, "loss": inp.log_rows}) as tmp:
            shutil.copyfile(store.path(final_hash), tmp)
        entry = store.info(h)
        sr.computed = 1
    else:
        sr.reused = 1
        sr.notes.append("restored a LoRA trained before with the same inputs")

    # Publish: <name>.safetensors, every saved epoch as <name>-000001.safetensors, the loss log.
    _publish(store.path(h), out_dir / f"{name}.safetensors")
    final_epoch = entry["epochs"][-1][0]
    wanted = {f"{name}-{e:06d}.safetensors": eh for e, eh in entry["epochs"] if e != final_epoch}
    for old in out_dir.glob(f"{name}-[0-9][0-9][0-9][0-9][0-9][0-9].safetensors"):
        if old.name not in wanted:
            old.unlink()
    for fname, eh in wanted.items():
        _publish(store.path(eh), out_dir / fname)
    _write_loss_csv(out_dir / "loss.csv", entry.get("loss", []))
    return sr.finish([{"id": name, "hash": h, "epochs": entry["epochs"]}])
