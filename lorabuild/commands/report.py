"""The run summary (``lorabuild report NAME``); the loss curve it lists is drawn by :mod:`lorabuild.train.lossplot`."""
from __future__ import annotations

import json
from pathlib import Path

from ..cache import read_json
from ..workspace import Workspace


def summary(ws: Workspace, name: str) -> dict | None:
    """What the last train of ``name`` produced, from its manifest, report and loss log."""
    manifest = read_json(ws.manifest(name, "train"))
    if not manifest or not manifest.get("items"):
        return None
    item = manifest["items"][0]
    report = read_json(ws.cache / "reports" / name / "train.json", {}) or {}
    side = read_json(ws.cache / "objects" / "train" / item["hash"][:2] / f"{item['hash'][2:]}.json", {}) or {}
    rows = side.get("info", {}).get("loss", [])
    out = ws.output_dir(item["id"])  # the item is the LoRA, named by output.name
    losses = [r[2] for r in rows]
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    files = sorted(out.glob("*.safetensors")) + [p for p in (out / "loss.csv", out / "loss.png",
                                                             out / "samples" / "grid.png") if p.exists()]
    return {
        "project": name,
        "steps": rows[-1][0] if rows else 0,
        "epochs": rows[-1][1] if rows else 0,
        "seconds": rows[-1][4] if rows else 0.0,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "mean_loss": sum(losses) / len(losses) if losses else None,
        "saved_epochs": [e for e, *_ in item["epochs"]],
        "validation_loss": [v[2] for v in side.get("info", {}).get("val", [])],
        # train.scale_weight_norms: kohya's max-norm logs of the last step, and how many steps scaled any module
        "max_norm": None if not rows or len(rows[-1]) <= 5 else {
            "keys_scaled": rows[-1][5], "average_key_norm": rows[-1][6], "max_key_norm": rows[-1][7],
            "steps_scaling": sum(1 for r in rows if r[5])},
        "notes": report.get("notes", []),
        "computed": report.get("computed"),
        "files": [{"path": ws.relative(p), "bytes": p.stat().st_size} for p in files],
    }


def render(s: dict) -> str:
    lines = [f"report for {s['project']}:",
             f"  {s['steps']} steps, {s['epochs']} epochs, {s['seconds']:.0f} s of training"]
    if s["final_loss"] is not None:
        lines.append(f"  loss: final {s['final_loss']:.4f} (mean of the last tenth), mean {s['mean_loss']:.4f}")
    lines.append(f"  saved epochs: {', '.join(map(str, s['saved_epochs']))}")
    if s["validation_loss"]:
        best = min(range(len(s["validation_loss"])), key=s["validation_loss"].__getitem__)
        lines.append(f"  validation loss by epoch: {', '.join(f'{v:.4f}' for v in s['validation_loss'])} "
                     f"(lowest after epoch {best + 1})")
    if s.get("max_norm"):
        m = s["max_norm"]
        lines.append(f"  max-norm (scale_weight_norms): {m['keys_scaled']} modules scaled at the last step, average norm "
                     f"{m['average_key_norm']:.4f}, largest {m['max_key_norm']:.4f}; {m['steps_scaling']} steps scaled any")
    for n in s["notes"]:
        lines.append(f"  note: {n}")
    lines.append("  files:")
    for f in s["files"]:
        lines.append(f"    {f['path']}  ({f['bytes'] / 2**20:.2f} MiB)")
    return "\n".join(lines)


def cmd_report(root: Path, name: str, as_json: bool) -> int:
    s = summary(Workspace(root), name)
    if s is None:
        print(f"lorabuild report: {name} has not been trained yet: run `doit train:{name}`")
        return 1
    print(json.dumps(s, indent=2) if as_json else render(s))
    return 0
