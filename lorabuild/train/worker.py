"""One process started by torchrun (see :mod:`lorabuild.train.dist`): a rank of a training run, or
one shard of a cache stage.

    python -m lorabuild.train.worker STAGE WORKSPACE PROJECT_FILE JOB_FOLDER

Each rank rebuilds the same run from the project and the manifests (nothing is pickled
across), does its share, and leaves its counts — or its error, for the parent to name —
in the job folder. The parent stage holds the project's lock and writes the manifest.
"""
from __future__ import annotations

import sys

from . import dist


def _message(exc: BaseException) -> str:
    from ..cache import CorruptEntry
    from ..config import ProjectError
    from ..stages.base import StageError
    from .loop import TrainError

    if isinstance(exc, (StageError, TrainError, FloatingPointError, ProjectError, CorruptEntry)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _run(stage: str, root: str, project_file: str, folder: str, rank: dist.Rank) -> dict:
    from ..dataset import from_project
    from ..stages import latents, runtime, textemb, train
    from ..stages.base import load_context
    from ..stages.spec import params_of

    ctx = load_context(root, project_file)
    ctx.memo["rank"] = rank
    if stage == "latents":
        return latents.run_shard(ctx, params_of(ctx.project, latents.PARAMS), dist.payload(folder), rank)
    if stage == "textemb":
        return textemb.run_shard(ctx, params_of(ctx.project, textemb.PARAMS), dist.payload(folder), rank)
    import torch.distributed as td

    dist.init_process_group(runtime.device(ctx))
    try:
        return train.run(ctx, from_project(ctx.project))
    finally:
        td.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    stage, root, project_file, folder = argv if argv is not None else sys.argv[1:]
    rank = dist.from_env()
    try:
        result = _run(stage, root, project_file, folder, rank)
    except Exception as exc:
        from ..cache import CorruptEntry

        corrupt = [exc.stage, str(exc.path), exc.reason] if isinstance(exc, CorruptEntry) else None
        dist.report(folder, rank, error=_message(exc), corrupt=corrupt)
        raise  # the traceback goes to this rank's stderr; torchrun stops the other ranks
    dist.report(folder, rank, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
