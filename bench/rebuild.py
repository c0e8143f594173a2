"""No-op rebuild and incremental add on large synthetic projects (issue 10, items 1 and 2).

For each project size: a cold ``doit train:bench`` (tiny model, one epoch), then the same
command with nothing changed (median of 3 runs, wall clock and CPU time, a fresh process each time, as a
user runs it), then one image added: per stage, items computed / reused and seconds, against
the cold build. ``--quick`` uses 200 and 1,000 images instead of 1,000 and 5,000.

    python bench/rebuild.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, make_image, measured, publish, table, workspace  # noqa: E402

CACHE_STAGES = ("resize", "bucket", "latents", "textemb")


def build(root: Path, label: str, code: str | None = None) -> tuple[float, dict, float]:
    """(wall s, the stage reports this build wrote, CPU s); ``code``: run the lorabuild
    package found there (PYTHONPATH) instead of the installed one."""
    env = {"LORABUILD_BUILD": label, **({"PYTHONPATH": code} if code else {})}
    wall, cpu, _, _ = measured([sys.executable, "-m", "doit", "train:bench"], root, env)
    reports = {}
    for stage in CACHE_STAGES + ("train",):
        f = root / "cache" / "reports" / "bench" / f"{stage}.json"
        if f.exists():
            r = json.loads(f.read_text())
            if r["build"] == label:
                reports[stage] = r
    return wall, reports, cpu


def noop_rows(root: Path, n: int, cold_wall: float, before: str | None, rounds: int) -> list[list]:
    """No-op builds, this checkout and (with ``before``) an older one alternating (ABAB)."""
    codes = [("this checkout", None)] + ([(f"before: {before}", before)] if before else [])
    got = {name: [] for name, _ in codes}
    for i in range(rounds):
        for name, code in codes:
            got[name].append(build(root, f"noop{i}{'b' if code else ''}", code))
    rows = []
    for name, _ in codes:
        ran = sorted({s for _, r, _ in got[name] for s in r})
        rows.append([n, name, f"{cold_wall:.1f}", f"{statistics.median(w for w, _, _ in got[name]):.2f}",
                     f"{statistics.median(c for _, _, c in got[name]):.2f}", ", ".join(ran) or "none"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 and 1,000 images (under 10 minutes on 2 cores)")
    ap.add_argument("--before", help="an older checkout (lorabuild/ and schemas/, e.g. from git archive): its no-op is timed too (ABAB)")
    ap.add_argument("--rounds", type=int, default=3, help="no-op builds per variant (median)")
    ap.add_argument("--workspace", type=Path, help="only the no-op, on this already built workspace (project 'bench')")
    args = ap.parse_args()
    if args.workspace:
        loads = [load()]
        n = len(list((args.workspace / "projects" / "bench").rglob("*.png")))
        rows = noop_rows(args.workspace.resolve(), n, float("nan"), args.before, args.rounds)
        loads.append(load())
        publish("No-op rebuild", f"### No-op rebuild: `doit train:bench` with nothing changed (median of {args.rounds}, "
                "new process, ABAB; CPU = user + system)\n\n"
                + table(["images", "code", "cold build s", "no-op wall s", "no-op CPU s", "stages that ran"], rows), loads)
        return
    sizes = (200, 1000) if args.quick else (1000, 5000)
    noop, add_rows, loads = [], [], [load()]
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "ws"
            concept = workspace(root, n)
            cold_wall, cold, _ = build(root, "cold")
            noop += noop_rows(root, n, cold_wall, args.before, args.rounds)
            make_image(concept / f"img{n:05d}.png", n)
            add_wall, add, _ = build(root, "add")
            cold_cache = sum(cold[s]["seconds"] for s in CACHE_STAGES if s in cold)
            add_cache = sum(add[s]["seconds"] for s in CACHE_STAGES if s in add)
            # the target excludes model loading (each stage's report says how much of its time that was)
            cold_work = sum(cold[s]["seconds"] - cold[s].get("model_load_seconds", 0) for s in CACHE_STAGES if s in cold)
            add_work = sum(add[s]["seconds"] - add[s].get("model_load_seconds", 0) for s in CACHE_STAGES if s in add)
            def secs(r):  # "stage s (of which model loading s)"
                load = r.get("model_load_seconds", 0)
                return f"{r['seconds']:.2f}" + (f" ({load:.2f})" if load >= 0.005 else "")

            for s in CACHE_STAGES + ("train",):
                c, a = cold.get(s), add.get(s)
                add_rows.append([n, s, f"{c['computed']} / {c['reused']}" if c else "-", secs(c) if c else "-",
                                 f"{a['computed']} / {a['reused']}" if a else "not run", secs(a) if a else "-"])
            add_rows.append([n, "**cache stages**", "", f"{cold_cache:.2f}", "",
                             f"{add_cache:.2f} ({100 * add_cache / cold_cache:.1f}% of cold)"])
            add_rows.append([n, "**cache stages, model loading excluded**", "", f"{cold_work:.2f}", "",
                             f"{add_work:.2f} ({100 * add_work / cold_work:.1f}% of cold)"])
            add_rows.append([n, "whole build (wall)", "", f"{cold_wall:.1f}", "", f"{add_wall:.1f}"])
    loads.append(load())
    text = (f"### No-op rebuild: `doit train:bench` with nothing changed (median of {args.rounds}, new process; "
            "CPU = user + system, which other processes on the shared cores inflate far less than wall)\n\n"
            + table(["images", "code", "cold build s", "no-op wall s", "no-op CPU s", "stages that ran"], noop)
            + "\n\n### One image added: per stage, computed / reused and seconds (stage time; in brackets the part of "
            "it that was model loading: importing torch, resolving and loading the model)\n\n"
            + table(["images", "stage", "cold computed / reused", "cold s", "add computed / reused", "add s"], add_rows))
    publish("Rebuilds" + (" (--quick)" if args.quick else ""), text, loads)


if __name__ == "__main__":
    main()
