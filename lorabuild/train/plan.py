"""Derived training numbers, the per-epoch batch order and the run plan, from numbers, keys and
the cache's entries only (no config, no torch).

kohya's arithmetic (``train_util.BaseDataset``): every image is seen ``repeats`` times
per epoch; batches hold images of one bucket; an optimizer step happens every
``gradient_accumulation_steps`` batches. The run plan (:class:`RunPlan`, :func:`decide`) says
which files a run saves under which keys, and what the train stage restores or continues from.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, replace

from ..cache import key_hash


@dataclass(frozen=True)
class Sample:
    id: str  # image id
    bucket: tuple[int, int]
    repeats: int
    is_reg: bool = False
    is_val: bool = False  # a validation image (dataset.val_dirs, an is_val concept): never trained on
    image: str = ""  # a multi-resolution sample's image (lorabuild.multires); "": the id is the image


def balance_reg(train: list[Sample], reg: list[Sample]) -> list[Sample]:
    """Regularization samples with repeats set so an epoch holds as many as training samples.

    kohya ``DreamBoothDataset``: take reg images with their own repeats until the count of
    training samples (images × repeats) is reached; if they fall short, go round again
    adding one repeat at a time. Reg images beyond that count are not used.
    """
    target = sum(s.repeats for s in train)
    if not reg or target == 0:
        return []
    repeats: dict[str, int] = {}
    n, first = 0, True
    while n < target:
        for s in reg:
            if first:
                repeats[s.id] = s.repeats
                n += s.repeats
            else:
                repeats[s.id] += 1
                n += 1
            if n >= target:
                break
        first = False
    return [replace(s, repeats=repeats[s.id]) for s in reg if s.id in repeats]


def hold_out(ids: list[str], share: float, seed: int) -> list[str]:
    """The images held out for validation: ``share`` of them (at least one when share > 0,
    never all), chosen by the seed, independent of the order they were found in."""
    if share <= 0 or len(ids) < 2:
        return []
    n = min(len(ids) - 1, max(1, round(share * len(ids))))
    return sorted(random.Random(derive_seed("validation", seed)).sample(sorted(ids), n))


def project_samples(every: list[Sample], train: dict) -> tuple[list[Sample], list[Sample]]:
    """:func:`training_samples` under the project's rule (``train``: its train section): the share
    ``validation_split`` held out, chosen by ``validation_seed`` (kohya), or by ``seed`` when that
    is unset. The train stage and ``lorabuild plan`` both split here, so they cannot disagree."""
    seed = train["seed"] if train.get("validation_seed") is None else train["validation_seed"]
    return training_samples(every, train["validation_split"], seed)


def training_samples(every: list[Sample], val_share: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(samples an epoch trains on, validation samples): training images minus the held-out
    ones, plus regularization images balanced against them (kohya); the validation images
    (``is_val``) and the held-out ones, both measured, neither trained on. ``seed`` chooses
    the held-out share among the training images only."""
    train = [s for s in every if not s.is_reg and not s.is_val]
    # an image is held out with all its resolutions: none of them trains what it measures
    held = set(hold_out(sorted({s.image or s.id for s in train}), val_share, seed))
    val = [s for s in train if (s.image or s.id) in held] + [s for s in every if s.is_val]
    train = [s for s in train if (s.image or s.id) not in held]
    return train + balance_reg(train, [s for s in every if s.is_reg]), val


@dataclass(frozen=True)
class TrainPlan:
    images: int  # training images (not regularization)
    reg_samples_per_epoch: int
    samples_per_epoch: int  # images × repeats, regularization included
    batch_size: int
    batches_per_epoch: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    epochs: int
    total_steps: int  # steps_per_epoch × epochs, or max_steps (which may cut the last epoch short)
    processes: int = 1  # ranks sharing each step's batches (train.processes × nodes)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.processes * self.gradient_accumulation_steps

    @property
    def cut_short(self) -> bool:
        """max_steps ends the last epoch before its end."""
        return self.total_steps < self.steps_per_epoch * self.epochs

    def epoch_end_step(self, epoch: int) -> int:
        """The global step at which ``epoch`` ends (the last one at total_steps)."""
        return min(epoch * self.steps_per_epoch, self.total_steps)

    def banner(self) -> str:
        return (
            f"  images {self.images}, samples per epoch {self.samples_per_epoch} (with repeats; "
            f"{self.reg_samples_per_epoch} regularization), "
            f"batch {self.batch_size}{f' × processes {self.processes}' if self.processes > 1 else ''} "
            f"× accumulation {self.gradient_accumulation_steps} = {self.effective_batch}\n"
            f"  batches per epoch {self.batches_per_epoch}, steps per epoch {self.steps_per_epoch}, "
            f"epochs {self.epochs}, total optimizer steps {self.total_steps}"
            + (f" (max_steps: epoch {self.epochs} stops after "
               f"{self.total_steps - (self.epochs - 1) * self.steps_per_epoch} of its steps)" if self.cut_short else "")
        )


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and platforms (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[tuple[Sample, int]]]:
    """The batches of one epoch: (sample, repeat index) pairs, one bucket per batch, shuffled by seed+epoch."""
    rng = random.Random(derive_seed("epoch", seed, epoch))
    by_bucket: dict[tuple[int, int], list[tuple[Sample, int]]] = {}
    for s in samples:
        for r in range(s.repeats):
            by_bucket.setdefault(s.bucket, []).append((s, r))
    batches = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        rng.shuffle(group)
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def make_plan(samples: list[Sample], batch_size: int, grad_accum: int, epochs: int,
              max_steps: int | None = None, processes: int = 1) -> TrainPlan:
    """kohya's step arithmetic; with several processes a step takes ``processes × grad_accum`` batches.
    ``max_steps`` (kohya max_train_steps), when given, replaces ``epochs``: as many epochs as it
    takes, the last one stopped at that step."""
    batches = len(epoch_batches(samples, batch_size, 0, 0))
    steps = math.ceil(batches / (grad_accum * processes))
    total = steps * epochs
    if max_steps and steps:
        epochs, total = max(1, math.ceil(max_steps / steps)), max_steps
    return TrainPlan(
        images=sum(not s.is_reg for s in samples),
        reg_samples_per_epoch=sum(s.repeats for s in samples if s.is_reg),
        samples_per_epoch=sum(s.repeats for s in samples),
        batch_size=batch_size,
        batches_per_epoch=batches,
        gradient_accumulation_steps=grad_accum,
        steps_per_epoch=steps,
        epochs=epochs,
        total_steps=total,
        processes=processes,
    )


# --- the run plan: what one train run saves, under which keys, and what it starts from ---

# Learning-rate schedules whose value at step s does not depend on the run's length: with
# these, epoch e of a 10-epoch run equals epoch e of a 6-epoch run, so epochs, states and
# snapshots are keyed without the length and a longer run continues a shorter one.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# what only decides how long a run goes and what it keeps, never the weights at a given epoch
LENGTH_PARAMS = ("epochs", "max_steps", "save_every_n_epochs", "save_every_n_steps")
# output settings: they shape the saved files, never the weights
OUTPUT_PARAMS = ("save_precision", "metadata", "bucket", "format")  # format: output.format (SD 3.5: PEFT names)


def weights_key(key: dict, total_steps: int) -> dict:
    """The run key without its length: what determines the weights after any given epoch."""
    train = {k: v for k, v in key["params"]["train"].items() if k not in LENGTH_PARAMS}
    wkey = {**key, "params": {**key["params"], "train": train}, "kind": "epoch-weights"}
    if train["lr_scheduler"] not in LENGTH_FREE_SCHEDULES or train.get("lr_warmup_ratio") is not None:
        wkey["total_steps"] = total_steps
    return wkey


def training_key(wkey: dict) -> dict:
    """The weights key without the output settings: the key of the training states and of the
    snapshots' full-precision weights, which every save precision and metadata share. A change of
    output settings finds them and writes the saved files again from them, training nothing."""
    return {**wkey, "params": {k: v for k, v in wkey["params"].items() if k not in OUTPUT_PARAMS}}


def entry_key(wkey: dict, plan: TrainPlan, kind: str, epoch: int) -> dict:
    """The key of the LoRA (``kind`` "epoch") or training state ("state") after ``epoch``. An
    epoch that max_steps cuts short is a different thing from the whole epoch: its key says
    where it stopped, so a longer run never takes it for a whole one."""
    key = {**wkey, kind: epoch}
    if plan.cut_short and epoch == plan.epochs:
        key["until_step"] = plan.total_steps
    return key


def ema_key(wkey: dict, plan: TrainPlan, epoch: int) -> dict:
    """The key of the EMA file of ``epoch`` (train.ema): the epoch's key, marked."""
    return {**entry_key(wkey, plan, "epoch", epoch), "weights": "ema"}


def step_save_points(every: int | None, plan: TrainPlan) -> dict[str, tuple[str, int]]:
    """{row id: (label, step)} of the steps ``train.save_every_n_steps`` saves at (kohya
    save_every_n_steps; the final step is the final file). Row ids are the sample stage's, so a
    step that is also sampled uses the same file."""
    if not every:
        return {}
    return {f"s{s:06d}": (f"step {s}", s) for s in range(every, plan.total_steps, every)}


@dataclass(frozen=True)
class RunPlan:
    """Which files one run saves and the keys of each: saved epochs, in-training sample points
    and the snapshots they need, step saves, training states."""

    plan: TrainPlan
    wkey: dict  # weights_key: the saved files' key
    saved: frozenset  # the epochs saved as files (the last one always)
    points: dict  # in-training sample points: {row id: (label, step)}
    snapshot_points: dict  # points that need a LoRA file of their own (step saves included)
    step_saves: dict  # train.save_every_n_steps: {row id: (label, step)}
    with_ema: bool  # train.ema: each saved epoch has an EMA file too

    @property
    def tkey(self) -> dict:
        """training_key(wkey): the key of training states and full-precision snapshots."""
        return training_key(self.wkey)

    def epoch_hash(self, epoch: int) -> str:
        return key_hash(entry_key(self.wkey, self.plan, "epoch", epoch))

    def state_hash(self, epoch: int) -> str:
        return key_hash(entry_key(self.tkey, self.plan, "state", epoch))

    def ema_hash(self, epoch: int) -> str:
        return key_hash(ema_key(self.wkey, self.plan, epoch))

    def snap_hash(self, row_id: str) -> str:
        return key_hash({**self.wkey, "snapshot": row_id})

    def full_hash(self, row_id: str) -> str:
        """A snapshot's full-precision weights (LoRANetwork.full_weights), kept to write it again."""
        return key_hash({**self.tkey, "snapshot": row_id})

    def snapshots_until(self, epoch: int) -> list[tuple[str, str, int]]:
        """(row id, label, step) of the snapshots taken up to the end of ``epoch``, by step."""
        rows = sorted(self.snapshot_points.items(), key=lambda kv: kv[1][1])
        return [(r, label, step) for r, (label, step) in rows if step <= self.plan.epoch_end_step(epoch)]


def run_plan(key: dict, plan: TrainPlan, save_every: int | None, step_every: int | None, points: dict,
             with_ema: bool) -> RunPlan:
    """The run plan of the run ``key`` (train.save_every_n_epochs ``save_every``,
    save_every_n_steps ``step_every``; ``points``: the sample stage's in-training points)."""
    saved = frozenset(e for e in range(1, plan.epochs + 1) if e == plan.epochs or (save_every and e % save_every == 0))
    # in-training sample points that need a LoRA file of their own (saved epochs have theirs)
    snapshot_points = {r: v for r, v in points.items() if r != "base" and not (r[0] == "e" and int(r[1:]) in saved)}
    step_saves = step_save_points(step_every, plan)
    return RunPlan(plan=plan, wkey=weights_key(key, plan.total_steps), saved=saved, points=points,
                   snapshot_points={**step_saves, **snapshot_points}, step_saves=step_saves, with_ema=with_ema)


class Whole:
    """Present and undamaged (each entry checked once per run): a damaged LoRA or state is
    reported, removed and made again, never published, sampled or continued from."""

    def __init__(self):
        self.checked: dict[tuple[str, str], bool] = {}

    def __call__(self, st, h: str) -> bool:
        if (st.stage + st.ext, h) not in self.checked:
            self.checked[(st.stage + st.ext, h)] = st.verified(h)
        return self.checked[(st.stage + st.ext, h)]

    def seen(self, st, h: str) -> None:
        """``h`` was just written whole."""
        self.checked[(st.stage + st.ext, h)] = True


@dataclass
class Start:
    """Where a run starts (:func:`decide`): restored whole, or trained on after ``epoch`` (0: from
    the start) with the saved epochs, snapshots and EMA files the store holds up to there."""

    restore: bool = False  # the run's entry and all its files are in the store: nothing to train
    epoch: int = 0
    epochs: list = field(default_factory=list)  # [epoch, hash, step] of each saved epoch
    snapshots: list = field(default_factory=list)  # [row id, label, step, hash]
    emas: list = field(default_factory=list)  # [epoch, hash, step] of each EMA file (train.ema)


def complete(rp: RunPlan, entry: dict | None, store, whole: Whole) -> bool:
    """The run's entry (its store info) and every file it names, or the plan asks for, are whole."""
    if entry is None or not all(whole(store, eh) for _, eh, *_ in entry.get("epochs", [])):
        return False
    have = {row_id: sh for row_id, _, _, sh in entry.get("snapshots", [])}
    if rp.with_ema and not all(whole(store, eh) for _, eh, *_ in entry.get("ema", [])):
        return False
    return all(r in have and whole(store, have[r]) for r in rp.snapshot_points)


def resume_point(rp: RunPlan, store, states, whole: Whole) -> int:
    """The last epoch whose training state, saved epochs (and their EMA files) and snapshots are
    all in the store, each saved file either as it is or as the full-precision weights to write it from."""
    for e0 in range(rp.plan.epochs, 0, -1):
        files = [(store, rp.epoch_hash(e), states, rp.state_hash(e)) for e in rp.saved if e <= e0]
        files += [(store, rp.ema_hash(e), states, rp.state_hash(e)) for e in rp.saved if e <= e0 and rp.with_ema]
        files += [(store, rp.snap_hash(r), states, rp.full_hash(r)) for r, (_, step) in rp.snapshot_points.items()
                  if step <= rp.plan.epoch_end_step(e0)]
        if (states.has(rp.state_hash(e0)) and all(a.has(ah) or b.has(bh) for a, ah, b, bh in files)
                and whole(states, rp.state_hash(e0)) and all(whole(a, ah) or whole(b, bh) for a, ah, b, bh in files)):
            return e0
    return 0


def decide(rp: RunPlan, entry: dict | None, store, states, whole: Whole) -> Start:
    """Restore the run (``entry``, its store info, complete), or continue after the last epoch the
    store holds (:func:`resume_point`), or train from the start. ``store``: the LoRA files,
    ``states``: training states and full-precision snapshots; nothing is read but their entries."""
    if complete(rp, entry, store, whole):
        return Start(restore=True)
    e0 = resume_point(rp, store, states, whole)
    end = rp.plan.epoch_end_step
    return Start(epoch=e0,
                 epochs=[[e, rp.epoch_hash(e), end(e)] for e in sorted(rp.saved) if e <= e0],
                 snapshots=[[r, label, step, rp.snap_hash(r)] for r, label, step in rp.snapshots_until(e0)],
                 emas=[[e, rp.ema_hash(e), end(e)] for e in sorted(rp.saved) if e <= e0] if rp.with_ema else [])


def start_note(rp: RunPlan, epoch: int, step: int | None, lr_scheduler: str) -> str | None:
    """What the stage reports about where a run started (``step``: the resumed state's)."""
    if epoch:
        return (f"continued from the training state after epoch {epoch} (step {step})" if epoch < rp.plan.epochs
                else f"assembled from epochs trained before (up to epoch {epoch})")
    if "total_steps" in rp.wkey:
        what = "warm-up ratio" if lr_scheduler in LENGTH_FREE_SCHEDULES else f"{lr_scheduler} schedule"
        return f"trained from the start: the {what} depends on the run's length, so no earlier run can be continued"
    return None
