"""The ``lorabuild`` command: project chores around the doit build (validate, init, plan, status, watch, tag, gc, serve),
and ``train`` for launching a build on several processes or nodes.

Training knobs live in the project YAML and its schema, never in flags here; ``train``'s flags
are torchrun's (how many processes, which nodes), ``--nproc`` overriding ``train.processes``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .workspace import Workspace, find_root

DODO = '''"""doit entry point: lorabuild's stages for every project in projects/."""
from pathlib import Path

from lorabuild.tasks import doit_config, make_task_creators

DOIT_CONFIG = doit_config(Path(__file__).resolve().parent)
globals().update(make_task_creators(Path(__file__).resolve().parent))
'''


def cmd_init(target: Path) -> int:
    """Make a workspace: projects/ with the demo, a dodo.py, a .gitignore for cache/ and output/."""
    from .resources import projects_dir

    target.mkdir(parents=True, exist_ok=True)
    if (target / "dodo.py").exists() or (target / "projects" / "demo.yaml").exists():
        print(f"lorabuild init: {target} already holds a workspace (dodo.py or projects/demo.yaml); nothing changed", file=sys.stderr)
        return 1
    src = projects_dir()
    (target / "projects").mkdir(exist_ok=True)
    shutil.copy2(src / "demo.yaml", target / "projects" / "demo.yaml")
    shutil.copytree(src / "demo", target / "projects" / "demo", dirs_exist_ok=True)
    (target / "dodo.py").write_text(DODO, encoding="utf-8")
    (target / ".gitignore").write_text("cache/\noutput/\n", encoding="utf-8")
    print(f"workspace ready in {target}: cd \"{target}\", then doit train:demo")
    return 0


def _collect_hashes(value, out: set[str]) -> None:
    """Every entry hash a manifest mentions, however deep (items, epochs, snapshots, states)."""
    if isinstance(value, str):
        if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            out.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_hashes(v, out)
    elif isinstance(value, list):
        for v in value:
            _collect_hashes(v, out)


def cmd_gc(root: Path, dry_run: bool) -> int:
    """Delete cache entries that no project's manifest references."""
    from .cache import read_json

    ws = Workspace(root)
    live: set[str] = set()
    for manifest in (ws.cache / "manifests").glob("*/*.json"):
        _collect_hashes((read_json(manifest, {}) or {}).get("items", []), live)
    removed = kept = freed = 0
    for sidecar_or_entry in sorted((ws.cache / "objects").glob("*/*/*")):
        if sidecar_or_entry.name.startswith("."):
            continue  # a temp file of a running writer
        h = sidecar_or_entry.parent.name + sidecar_or_entry.name.split(".", 1)[0]
        if h in live:
            kept += 1
            continue
        removed += 1
        freed += sidecar_or_entry.stat().st_size
        if not dry_run:
            sidecar_or_entry.unlink()
    verb = "would remove" if dry_run else "removed"
    print(f"gc: {verb} {removed} files ({freed / 2**20:.1f} MiB), kept {kept}")
    _gc_leftovers(ws, dry_run, verb)
    return 0


def _gc_leftovers(ws: Workspace, dry_run: bool, verb: str) -> None:
    """Temp files and folders of killed runs (``.*.tmp-*``, ``cache/jobs/``): see leftovers.py."""
    from . import leftovers

    gone, waiting, busy = leftovers.find(ws.cache)
    count, freed = leftovers.remove(gone, dry_run)
    line = f"gc: {verb} {count} leftover temp files and folders ({freed / 2**20:.1f} MiB)"
    if waiting:
        why = "a build is running" if busy else "less than an hour old"
        line += f", kept {len(waiting)} ({why}: run gc again later)"
    print(line)


def _project(root: Path, name: str):
    """Load ``projects/NAME.yaml`` (or a path to a YAML file); problems go to stderr."""
    from .config import load_named

    return load_named(Workspace(root).projects, name)


def _tagged(root: Path, project) -> dict[str, str] | None:
    """The captions of the tag stage's last run; a note when a tagger is set but has not run."""
    from .cache import read_json
    from .stages.tag import captions_of, enabled

    if not enabled(project):
        return None
    manifest = read_json(Workspace(root).manifest(project.name, "tag"))
    if not isinstance(manifest, dict):
        print(f"note: the tagger has not run yet, so captions are shown without its tags: lorabuild tag {project.name}",
              file=sys.stderr)
        return None
    return captions_of(manifest)


def cmd_plan(root: Path, name: str, as_json: bool) -> int:
    import json

    from .cache import FileHashes
    from .dataset import DatasetError
    from .stages.preview import build_plan, render

    project = _project(root, name)
    if project is None:
        return 1
    hashes = FileHashes(Workspace(root).cache / "hashes.json")
    try:
        plan = build_plan(project, hashes, _tagged(root, project))
    except DatasetError as exc:
        print(f"{project.file}: dataset: {exc}", file=sys.stderr)
        return 1
    if Workspace(root).cache.is_dir():
        hashes.save()
    print(json.dumps(plan, indent=1) if as_json else render(plan))
    return 0


def cmd_status(root: Path, name: str, as_json: bool, rehash: bool = False) -> int:
    import json

    from .faults import WorkspaceError, check_workspace
    from .commands.status import project_status, render

    try:
        check_workspace(Workspace(root))  # cache/ a file, a damaged doit database
        if rehash:
            from .commands.status import rehash as forget_hashes

            print(forget_hashes(root, name), file=sys.stderr if as_json else sys.stdout)
        st = project_status(root, name)
    except KeyError as exc:
        print(f"lorabuild status: {exc.args[0]}", file=sys.stderr)
        return 1
    except WorkspaceError as exc:
        print(f"lorabuild status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=1) if as_json else render(st))
    return 1 if st.get("error") else 0


def cmd_train(root: Path, name: str, launch: dict, until: str) -> int:
    """Build NAME up to ``until`` with training spread over processes (and nodes) by torchrun.

    Node 0 runs the build (``doit train:NAME``); its train stage starts torchrun with these
    options, and rank 0 there writes everything. Another node only starts its ranks, which
    read the caches and the project from the shared workspace and write nothing.
    """
    import os
    import subprocess

    from .train import dist

    for k, v in launch.items():
        if v is not None:
            os.environ[dist.ENV[k]] = str(v)
    project = _project(root, name)
    if project is None:
        return 1
    opts = dist.launch_options(project)
    try:
        dist.check_launch(opts)
        if opts.node_rank == 0:
            return subprocess.run([sys.executable, "-m", "doit", f"{until}:{project.name}"], cwd=root).returncode
        dist.run_ranks("train", Workspace(root).cache, root, project.file, opts)
    except dist.LaunchError as exc:
        print(f"lorabuild train: {exc}", file=sys.stderr)
        return 1
    print(f"lorabuild train: node {opts.node_rank} of {opts.nnodes} finished its ranks; node 0 writes the LoRA")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .winenv import safe_console

    safe_console()  # messages hold "→" and "≤", which a redirected Windows console (cp1252) cannot print
    ap = argparse.ArgumentParser(prog="lorabuild", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="check project files against the schema (default: projects/*.yaml)")
    p.add_argument("files", nargs="*")
    p = sub.add_parser("init", help="make a workspace with the demo project")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("plan", help="what a project will train on: concepts, buckets, steps, tags, warnings")
    p.add_argument("name", help="project name (projects/NAME.yaml) or a YAML path")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("status", help="each stage up to date or stale, and why (no model is loaded)")
    p.add_argument("name", help="project name (projects/NAME.yaml)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rehash", action="store_true",
                   help="forget the remembered hashes of NAME's files, so the next build re-reads them (a file "
                        "rewritten with the same size and mtime is otherwise not noticed, as with make)")
    p = sub.add_parser("watch", help="build as images and captions land (default: up to the caches)")
    p.add_argument("name", help="project name (projects/NAME.yaml)")
    p.add_argument("--until", choices=["latents", "train", "sample"], default="latents",
                   help="how far each build goes: latents (the caches, so a later train starts at once), train or sample")
    p.add_argument("--quiet", type=float, default=1.0, help="seconds without changes before a build starts")
    p = sub.add_parser("report", help="the last training run: steps, time, loss, saved files")
    p.add_argument("name", help="project name (projects/NAME.yaml)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("import-kohya", aliases=["import"],
                       help="write a project from a kohya setup: sd-scripts TOML or command line, dataset config, "
                            "lora-scripts train.ps1/train.sh, kohya_ss GUI JSON, ai-toolkit YAML, OneTrainer JSON")
    p.add_argument("config", type=Path, help="the kohya file (told apart by its content)")
    p.add_argument("--dataset-config", type=Path, help="kohya dataset config TOML ([[datasets]] / [[datasets.subsets]])")
    p.add_argument("--root", type=Path, help="the folder the tool ran in, which its relative paths start from "
                                             "(default: the config's folder)")
    p.add_argument("-o", "--output", type=Path, help="the project YAML to write (default: print it)")
    p = sub.add_parser("tag", help="run the WD14 tag stage and print each image's caption; --write puts them beside the images")
    p.add_argument("name", help="project name (projects/NAME.yaml)")
    p.add_argument("--write", action="store_true", help="write the captions as caption files beside the images that have none")
    p.add_argument("--force", action="store_true", help="with --write: also overwrite caption files that differ")
    p = sub.add_parser("train", help="build a LoRA, training on several processes/GPUs/nodes through torchrun")
    p.add_argument("name", help="project name (projects/NAME.yaml)")
    p.add_argument("--nproc", type=int, help="processes on this machine, one per GPU (default: train.processes)")
    p.add_argument("--nnodes", type=int, help="machines taking part (torchrun --nnodes; default 1)")
    p.add_argument("--node-rank", type=int, help="this machine's place, 0 … nnodes-1; node 0 runs the build and writes")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of node 0, where the nodes meet (torchrun --rdzv-endpoint)")
    p.add_argument("--until", choices=["train", "sample"], default="train", help="on node 0: stop after train or sample")
    p = sub.add_parser("serve", help="a local web dashboard: status, builds and a queue, live training, samples, captions")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs the printed token)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p = sub.add_parser("gc", help="delete cache entries no project uses")
    p.add_argument("--dry-run", action="store_true")
    sub.add_parser("doctor", help="what this machine can do (GPU, bf16, optional packages, paths, disk, versions), and fixes")
    args = ap.parse_args(argv)
    if args.cmd == "validate":
        from .commands.validate import cmd_validate

        return cmd_validate(args.files)
    if args.cmd == "init":
        return cmd_init(args.dir)
    if args.cmd == "plan":
        return cmd_plan(find_root(), args.name, args.json)
    if args.cmd == "status":
        return cmd_status(find_root(), args.name, args.json, args.rehash)
    if args.cmd in ("import-kohya", "import"):
        from .importers.write import cmd_import

        return cmd_import(args.config, args.dataset_config, args.output, args.root)
    if args.cmd == "report":
        from .commands.report import cmd_report

        return cmd_report(find_root(), args.name, args.json)
    if args.cmd == "watch":
        from .commands.watch import cmd_watch

        return cmd_watch(find_root(), args.name, args.until, args.quiet)
    if args.cmd == "tag":
        if args.force and not args.write:
            ap.error("--force only applies with --write (it lets --write overwrite caption files)")
        from .commands.tag import cmd_tag

        return cmd_tag(find_root(), args.name, args.write, args.force)
    if args.cmd == "train":
        launch = {"nproc": args.nproc, "nnodes": args.nnodes, "node_rank": args.node_rank,
                  "rdzv_endpoint": args.rdzv_endpoint}
        return cmd_train(find_root(), args.name, launch, args.until)
    if args.cmd == "serve":
        from .serve import cmd_serve

        return cmd_serve(find_root(), args.host, args.port, args.open)
    if args.cmd == "gc":
        return cmd_gc(find_root(), args.dry_run)
    if args.cmd == "doctor":
        from .commands.doctor import cmd_doctor

        return cmd_doctor(find_root())
    return 2


if __name__ == "__main__":
    sys.exit(main())
