"""Derived training numbers and the per-epoch batch order, from numbers only (no config, no torch).

kohya's arithmetic (``train_util.BaseDataset``): every image is seen ``repeats`` times
per epoch; batches hold images of one bucket; an optimizer step happens every
``gradient_accumulation_steps`` batches.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    id: str  # image id
    bucket: tuple[int, int]
    repeats: int


@dataclass(frozen=True)
class TrainPlan:
    images: int
    samples_per_epoch: int  # images × repeats
    batch_size: int
    batches_per_epoch: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    epochs: int
    total_steps: int

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    def banner(self) -> str:
        return (
            f"  images {self.images}, samples per epoch {self.samples_per_epoch} (with repeats), "
            f"batch {self.batch_size} × accumulation {self.gradient_accumulation_steps} = {self.effective_batch}\n"
            f"  batches per epoch {self.batches_per_epoch}, steps per epoch {self.steps_per_epoch}, "
            f"epochs {self.epochs}, total optimizer steps {self.total_steps}"
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


def make_plan(samples: list[Sample], batch_size: int, grad_accum: int, epochs: int) -> TrainPlan:
    batches = len(epoch_batches(samples, batch_size, 0, 0))
    steps = math.ceil(batches / grad_accum)
    return TrainPlan(
        images=len(samples),
        samples_per_epoch=sum(s.repeats for s in samples),
        batch_size=batch_size,
        batches_per_epoch=batches,
        gradient_accumulation_steps=grad_accum,
        steps_per_epoch=steps,
        epochs=epochs,
        total_steps=steps * epochs,
    )
