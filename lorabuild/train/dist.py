"""Several processes, one run: how many, which one this is, how an epoch's batches are shared
out, the DistributedDataParallel wrapper, and the launch through torchrun.

The launcher is PyTorch's own (``python -m torch.distributed.run``, i.e. ``torchrun``): it
starts the processes, gives each its RANK / WORLD_SIZE / LOCAL_RANK, and when one fails it
stops the others and exits non-zero. A stage that wants several processes starts torchrun
on :mod:`lorabuild.train.worker`, waits, and reads back what the ranks wrote to a job folder
(their counts, or the error of the rank that failed).

No torch at import: tasks.py reads :func:`launch_options` while doit loads the graph.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

# What `lorabuild train NAME --nproc/--nnodes/--node-rank/--rdzv-endpoint` hands to the
# build it starts (doit runs the stages, so the options travel in the environment).
ENV = {"nproc": "LORABUILD_NPROC", "nnodes": "LORABUILD_NNODES", "node_rank": "LORABUILD_NODE_RANK",
       "rdzv_endpoint": "LORABUILD_RDZV_ENDPOINT"}


class LaunchError(Exception):
    """The ranks did not finish; the message names the rank that failed and its error.
    ``corrupt``: (stage, path, reason) when that error was an unreadable cache entry."""

    def __init__(self, message: str, corrupt: list | None = None, who: str = ""):
        super().__init__(message)
        self.corrupt, self.who = corrupt, who

    def for_stage(self, where: str) -> Exception:
        """The parent stage's error: an unreadable cache entry stays a CorruptEntry (so the build
        removes it and the next run recomputes just that entry), anything else a StageError."""
        from ..cache import CorruptEntry
        from ..errors import StageError

        if self.corrupt:
            stage, path, reason = self.corrupt
            return CorruptEntry(stage, Path(path), f"{reason}; read by {self.who}")
        return StageError(f"{where}: {self}")


@dataclass(frozen=True)
class Rank:
    """This process's place in the run (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes entries, states, logs, progress and samples."""
        return self.rank == 0


SINGLE = Rank()


def from_env() -> Rank:
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


@dataclass(frozen=True)
class Launch:
    """How many processes per node, how many nodes, and how they meet (torchrun's options)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def launch_options(project) -> Launch:
    """``train.processes`` (processes per node), overridden by ``lorabuild train --nproc``, and
    the multi-node options that command passes through."""
    env = {k: os.environ.get(v) for k, v in ENV.items()}
    return Launch(nproc=int(env["nproc"] or project.get("train.processes")), nnodes=int(env["nnodes"] or 1),
                  node_rank=int(env["node_rank"] or 0), rdzv_endpoint=env["rdzv_endpoint"] or None)


def cache_launch(project) -> Launch | None:
    """The processes a cache stage shares its missing keys over: ``train.processes`` on this
    machine (the caches are built before training; other nodes read them from the shared
    workspace), or None for one."""
    nproc = launch_options(project).nproc
    return Launch(nproc=nproc) if nproc > 1 else None


def keyed_train(train: dict, world: int) -> dict:
    """The ``train`` settings as they shape the weights: what matters is the global batch, so
    ``processes`` is folded into the accumulation (2 processes × accumulation 1 train the
    same steps as 1 process × accumulation 2). With one process the settings are unchanged,
    so keys made before this option existed stay valid."""
    out = {k: v for k, v in train.items() if k != "processes"}
    out["gradient_accumulation_steps"] = train["gradient_accumulation_steps"] * world
    return out


def micro_batches(batches: list, accum: int, rank: Rank = SINGLE) -> list[tuple[list, bool, bool, bool]]:
    """This rank's share of one epoch: ``(batch, live, ends_step, last)`` tuples.

    The epoch's batches (the same list on every rank: ``epoch_batches`` is seeded) are cut
    into optimizer steps of ``world × accum`` batches; rank r takes batches r, r+world, …
    of each step. Each micro-batch's loss is divided by ``accum`` and DDP averages the
    ranks' gradients, so a step's gradient is the sum over its batches divided by
    ``world × accum``: the same as one process accumulating ``world × accum`` batches.
    A rank with no batch in the last, short step still joins that step's all-reduce with a
    batch whose loss is weighted 0 (``live`` False), as DDP needs every rank in every
    reduction. With one process this is the familiar "step every ``accum`` batches and at
    the end of the epoch". ``last`` marks the step's last batch in epoch order (on one
    rank): its loss is the one the log shows, as with one process.
    """
    group = accum * rank.world
    out = []
    for start in range(0, len(batches), group):
        end = min(start + group, len(batches))
        mine = [(b, True, i == end - 1) for i, b in enumerate(batches[start:end], start) if (i - start) % rank.world == rank.rank]
        mine = mine or [(batches[start], False, False)]
        out.extend((b, live, j == len(mine) - 1, last) for j, (b, live, last) in enumerate(mine))
    return out


def shard(items: list, rank: Rank) -> list:
    """A cache stage's share: every ``world``-th missing item, so each is computed by one rank."""
    return items[rank.rank:: rank.world]


def local_device(device):
    """With several processes on a CUDA machine each rank takes its own GPU (LOCAL_RANK)."""
    import torch

    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if local >= gpus:
        raise ValueError(f"process {local} of this machine has no GPU of its own (torch sees {gpus}): "
                         "use at most that many processes (train.processes / --nproc)")
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    return dev


def init_process_group(device) -> None:
    """NCCL between GPUs, gloo on CPU; the address comes from torchrun's environment. The
    timeout is generous: rank 0 renders samples and saves while the others wait."""
    from datetime import timedelta

    import torch.distributed as td

    td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))


def _denoiser_class():
    import torch

    class Denoiser(torch.nn.Module):
        """The UNet's forward as a module whose only parameters are the LoRA's (the frozen base
        is held in a list, so DDP neither broadcasts nor reduces it): DDP needs the forward
        to pass through the module it wraps."""

        def __init__(self, unet, network, predict):
            super().__init__()
            self.network = network
            self._unet = [unet]
            self._predict = predict  # the family's call of its denoiser (Family.predict)

        def forward(self, noisy, t, hidden, added):
            return self._predict(self._unet[0], noisy, t, hidden, added)

    return Denoiser


class Denoise:
    """``denoise(noisy, t, hidden, added)`` → the UNet's prediction; with several ranks through
    DDP, whose gradient all-reduce runs only on a step's last micro-batch."""

    def __init__(self, unet, network, rank: Rank, device, predict):
        self.rank = rank
        self.module = _denoiser_class()(unet, network, predict)
        self.ddp = None
        if rank.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda" else None)

    def __call__(self, noisy, t, hidden, added, ends_step: bool = True):
        if self.ddp is None:
            return self.module(noisy, t, hidden, added)
        # what DDP's no_sync() context sets: no all-reduce on this micro-batch's backward
        # unless it ends the step (torch/nn/parallel/distributed.py: no_sync)
        self.ddp.require_backward_grad_sync = ends_step
        return self.ddp(noisy, t, hidden, added)

    def logged(self, value: float, last: bool) -> float:
        """A step's loss for the log: that of its last batch, from the rank that has it (so the
        log reads the same as one process accumulating)."""
        if self.ddp is None:
            return value
        import torch
        import torch.distributed as td

        t = torch.tensor([value if last else 0.0], dtype=torch.float64, device=next(self.module.parameters()).device)
        td.all_reduce(t)
        return float(t[0])


# ---------------------------------------------------------------------------- launching

def _torchrun(launch: Launch, args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}",
           f"--nnodes={launch.nnodes}", "--max-restarts=0"]
    if launch.nnodes > 1:
        # static rendezvous: node 0 is where rank 0 (the writer) runs, as the user said
        cmd += [f"--node-rank={launch.node_rank}", f"--rdzv-endpoint={launch.rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]  # a free local port, so two builds on one machine do not collide
    return cmd + ["-m", "lorabuild.train.worker", *args]


def check_launch(launch: Launch) -> None:
    if launch.world > 1 and sys.platform == "win32":
        # Windows builds of PyTorch have no NCCL, and torchrun's TCPStore asks for libuv, which
        # they lack ("use_libuv was requested but PyTorch was built without libuv", pytorch#139990)
        raise LaunchError(f"{launch.world} processes (train.processes / --nproc / --nnodes) cannot run on Windows: "
                          "PyTorch there has no NCCL and torchrun cannot start; set train.processes: 1 "
                          "(or use Linux or WSL2 for several GPUs)")
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        raise LaunchError(f"--nnodes {launch.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address)")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise LaunchError(f"--node-rank {launch.node_rank} is not in 0…{launch.nnodes - 1}")


def run_ranks(job: str, cache_root: Path, root: Path, project_file: Path, launch: Launch,
              payload: object = None) -> list[dict]:
    """Run ``job`` (a stage name) on ``launch.nproc`` local processes through torchrun and return
    what each local rank reported. A failure raises :class:`LaunchError` naming the rank
    that failed first and its error (torchrun has stopped the others)."""
    from ..cache import write_json

    check_launch(launch)
    folder = Path(cache_root) / "jobs" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    try:
        if payload is not None:
            write_json(folder / "payload.json", payload)
        cmd = _torchrun(launch, [job, str(root), str(project_file), str(folder)])
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise _failure(folder, code, launch)
        return [json.loads(f.read_text(encoding="utf-8")) for f in sorted(folder.glob("result-*.json"))]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _failure(folder: Path, code: int, launch: Launch) -> LaunchError:
    """The first rank's error: a rank that fails first breaks the others' collectives, so the
    earliest report is the cause."""
    from ..cache import read_json

    errors = sorted((read_json(f) for f in folder.glob("error-*.json")),
                    key=lambda e: e["time"])
    if not errors:
        return LaunchError(f"torchrun exited with code {code} and no rank reported an error "
                           "(a process was killed, or could not start: see the output above)")
    e = errors[0]
    who = f"rank {e['rank']} of {launch.world}"
    return LaunchError(f"{who} failed: {e['error']}", e.get("corrupt"), who)


def report(folder: str | Path, rank: Rank, result: dict | None = None, error: str | None = None,
           corrupt: list | None = None) -> None:
    """A rank's answer to its parent: its counts, or its error (written before it exits)."""
    from ..cache import write_json

    if error is not None:
        write_json(Path(folder) / f"error-{rank.rank}.json", {"rank": rank.rank, "error": error, "time": time.time(),
                                                                  "corrupt": corrupt})
    else:
        write_json(Path(folder) / f"result-{rank.rank}.json", {"rank": rank.rank, **(result or {})})


def payload(folder: str | Path):
    path = Path(folder) / "payload.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
