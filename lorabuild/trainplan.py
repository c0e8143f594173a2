"""Derived training numbers and the per-epoch batch order, from numbers only (no config, no torch).

kohya's arithmetic (``train_util.BaseDataset``): every image is seen ``repeats`` times
per epoch; batches hold images of one bucket; an optimizer step happens every
``gradient_accumulation_steps`` batches.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace


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
