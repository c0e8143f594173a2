"""lorabuild against kohya sd-scripts, side by side in one run (issue 26).

One random full-size SD 1.5 (a single LDM-layout .safetensors both tools read) and one folder of
8 square images with captions are built once; then kohya's ``train_network.py`` (its own virtual
environment, pinned commit: bench/kohya_setup.py) and ``doit train:bench`` (a new lorabuild
workspace, so its latents are cached in the run, as kohya's are) run one after the other, each a
fresh process, at the same settings: LoRA dim 32 / alpha 16 on UNet and text encoder, AdamW 1e-4,
constant LR, fp32, SDPA, batch 1, the same resolution and number of steps, latents cached first.

Both are timed from their own output the same way: every line (and progress-bar update) the child
writes is timestamped as it arrives. s/step is the median over steps 2..N (step 1 also pays for
warm-up); start → first step done; latent caching s/image over images 2..8; peak RSS of the
whole process tree (polled). The two saved LoRA files must hold the same modules with the same
shapes. The compute floor is an fp32 sgemm rate measured in the same run: a frozen-base LoRA step
costs about two UNet forwards (180 GFLOP at 256 px, 803 at 512).

    python bench/kohya_side.py [--quick] [--size 512] [--steps 8] [--kohya-src CLONE-OR-URL]
                               [--kohya-home DIR] [--quiet-below 1.0] [--append]

``--quick`` (256 px, 3 steps) is a smoke test of the harness, not a measurement; CI never runs it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # ldm_layout: lorabuild's writer of the single-file layout
import kohya_setup  # noqa: E402
from common import GIB, MODELS, RESULTS, STEP, load, machine, sd15_folder, sd15_project, table  # noqa: E402

UNET_GFLOP = {256: 180, 512: 803}  # one SD 1.5 UNet forward at batch 1 (issue 26)
KOHYA_STEP = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
BAR = re.compile(r"\d+%\|[^|]*\|\s*(\d+)/(\d+)")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Case:
    """One tool's run: its output lines with the seconds since start each arrived at."""
    name: str
    lines: list[tuple[float, str]] = field(default_factory=list)
    wall: float = 0.0
    rss_gib: float = 0.0
    rc: int | None = None
    error: str | None = None  # set when the tool could not run (setup failed)

    def progress(self, pattern: re.Pattern, after: str | None = None) -> dict[int, float]:
        """Progress count k → seconds when k was first shown (lines of ``pattern``, from the
        first line containing ``after`` on)."""
        seen, armed = {}, after is None
        for t, line in self.lines:
            armed = armed or after.lower() in line.lower()
            m = pattern.search(line) if armed else None
            if m:
                seen.setdefault(int(m.group(1)), t)
        return seen

    def save(self, folder: Path, stamp: str) -> Path:
        """The whole timestamped output, for reading what a run did."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stamp}-{self.name}.log"
        path.write_text("".join(f"{t:9.2f}  {line}\n" for t, line in self.lines) or f"{self.error}\n", encoding="utf-8")
        return path

    def tail(self, n: int = 15) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def pieces(chunk: str) -> list[str]:
    """The lines in one chunk of output, the last one too, unterminated: tqdm writes each update
    as "\\r" + text, so waiting for the next delimiter would date every update one update late."""
    return [ln for ln in re.split(r"[\r\n]", chunk) if ln.strip()]


def tree_rss(proc) -> int:
    """Resident bytes of ``proc`` and all its descendants (dataloader workers, doit's children)."""
    import psutil

    total = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def watch(case: Case, cmd: list[str], cwd: Path, env: dict) -> Case:
    """Run ``cmd`` in a fresh process, timestamping each output line as it arrives (a reader
    thread) while this thread polls the process tree's RSS."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **OFFLINE, **env})
    ps = psutil.Process(proc.pid)

    def read() -> None:
        while chunk := os.read(proc.stdout.fileno(), 65536).decode("utf-8", "replace"):
            now = time.perf_counter() - t0
            case.lines += [(now, ln) for ln in pieces(chunk)]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    reader.join(30)
    case.wall, case.rss_gib, case.rc = time.perf_counter() - t0, peak / GIB, proc.returncode
    return case


def wait_quiet(below: float | None, limit: float) -> str:
    """Wait (at most ``limit`` s) until the 1-minute load average is below ``below``; the load seen."""
    t = time.monotonic()
    while below is not None and os.getloadavg()[0] >= below and time.monotonic() - t < limit:
        time.sleep(5)
    return load()


def sgemm_gflops() -> float:
    """fp32 matrix-multiply rate of this machine, best of a few 2048² and 4096² products."""
    import torch

    best = 0.0
    for n, reps in ((2048, 5), (4096, 2)):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def single_file() -> Path:
    """The random SD 1.5 as one LDM-layout .safetensors (kohya's usual input), built once."""
    from ldm_layout import pipeline_to_ldm
    from safetensors.torch import save_file

    out = MODELS / "sd15-random-ldm.safetensors"
    if not out.is_file():
        sd = pipeline_to_ldm(sd15_folder())
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        tmp.replace(out)
    return out


def kohya_cmd(tree: Path, py: Path, ckpt: Path, data: Path, out: Path, tok: Path, size: int, steps: int,
              checkpointing: bool = False, unet_only: bool = False) -> list[str]:
    """train_network.py at lorabuild's settings; ``tok`` is the CLIP tokenizer where kohya's
    --tokenizer_cache_dir looks for it (its model id with / as _), so nothing is downloaded."""
    extra = (["--gradient_checkpointing"] if checkpointing else []) + (["--network_train_unet_only"] if unet_only else [])
    return [str(py), str(tree / "train_network.py"), "--pretrained_model_name_or_path", str(ckpt),
            "--train_data_dir", str(data), "--caption_extension", ".txt", "--resolution", str(size),
            "--output_dir", str(out), "--output_name", "kohya", "--save_model_as", "safetensors",
            "--network_module", "networks.lora", "--network_dim", "32", "--network_alpha", "16",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
            "--max_train_steps", str(steps), "--train_batch_size", "1", "--mixed_precision", "no",
            "--save_precision", "float", "--sdpa", "--cache_latents", "--seed", "0",
            "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir", str(tok.parent)] + extra


def lora_shapes(path: Path | None) -> dict[str, tuple]:
    """Saved LoRA tensor name → shape, names normalised (kohya's ``lora_te_`` = ``lora_te1_``)."""
    from safetensors import safe_open

    if path is None or not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        return {re.sub(r"^lora_te1_", "lora_te_", k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def same_modules(a: dict, b: dict) -> str:
    if not a or not b:
        return "not compared (a file is missing)"
    mods = {k.split(".")[0] for k in a}
    if a == b:
        return f"same {len(mods)} modules, {len(a)} tensors, shapes match"
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shape = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return (f"DIFFER: {len(only_a)} only in kohya (e.g. {only_a[:2]}), {len(only_b)} only in lorabuild "
            f"(e.g. {only_b[:2]}), {len(shape)} shapes differ (e.g. {shape[:2]})")


def figures(case: Case, step_re: re.Pattern, cache_after: str, cache_re: re.Pattern) -> dict:
    if case.error or case.rc is None:
        return {}
    steps = case.progress(step_re)
    ks = sorted(steps)
    per = [steps[k] - steps[k - 1] for k in ks if k >= 2 and k - 1 in steps]
    cache = {k: t for k, t in case.progress(cache_re, cache_after).items() if not steps or t < steps[min(ks)]}
    ck = sorted(k for k in cache if k >= 1)
    return {"s/step": statistics.median(per) if per else None,
            "first": steps.get(1), "rss": case.rss_gib, "steps": sum(k >= 1 for k in ks),
            "cache": (cache[ck[-1]] - cache[ck[0]]) / (ck[-1] - ck[0]) if len(ck) >= 2 else None}


def fmt(v, unit: str = "", nd: int = 2) -> str:
    return "–" if v is None else f"{v:.{nd}f}{unit}"


def ratio(a, b) -> str:
    return "–" if a is None or b is None or not b else f"{a / b:.2f}×"


def report(args, k: dict, lb: dict, kcase: Case, lcase: Case, modules: str, rates: list[float], loads: list[str],
           kver: str) -> str:
    floor = 2 * UNET_GFLOP[args.size] / max(rates)
    rows = []
    for label, key, unit, nd in (("s/step (median of steps 2..N)", "s/step", "", 2),
                                 ("latent caching, s/image (images 2..N)", "cache", "", 2),
                                 ("start → first step done, s", "first", "", 1),
                                 ("peak RSS (process tree), GiB", "rss", "", 2)):
        rows.append([label, fmt(k.get(key), unit, nd), fmt(lb.get(key), unit, nd), ratio(lb.get(key), k.get(key))])
    rows.append(["compute floor / s/step", ratio(floor, k.get("s/step")).rstrip("×"),
                 ratio(floor, lb.get("s/step")).rstrip("×"), ""])
    status = []
    for c in (kcase, lcase):
        if c.error:
            status.append(f"- **{c.name} did not run**: {c.error}")
        elif c.rc != 0:
            status.append(f"- **{c.name} exited {c.rc}**; its last lines:\n\n```\n{c.tail()}\n```")
    head = (f"### {args.size} px, {args.steps} steps, 8 images, SD 1.5 architecture (random weights, fp32), "
            f"LoRA dim 32 / α 16 on {'the UNet (text encoder frozen)' if args.unet_only else 'UNet + text encoder'}, "
            f"{'gradient checkpointing, ' if args.gradient_checkpointing else ''}"
            f"AdamW 1e-4, SDPA, batch 1, latents cached in the run; "
            f"each tool a fresh process{' (--quick: a smoke test, not a measurement)' if args.quick else ''}\n\n")
    notes = [f"- modules trained: {modules}",
             f"- compute floor: sgemm {', '.join(f'{r:.0f}' for r in rates)} GFLOP/s (before, after) → "
             f"2 × {UNET_GFLOP[args.size]} GFLOP / {max(rates):.0f} GFLOP/s = {floor:.2f} s/step",
             f"- steps seen: kohya {k.get('steps', 0)}, lorabuild {lb.get('steps', 0)}; wall: kohya "
             f"{kcase.wall:.1f} s, lorabuild {lcase.wall:.1f} s",
             f"- load average (1/5/15 min) before kohya, before lorabuild, after: {', '.join(loads)}",
             "- lorabuild's CPU convolution paths: " + ("timed in this run (--fresh-tuning)" if args.fresh_tuning
                                                        else "the machine's choices (~/.cache/lorabuild/tuning)"),
             f"- kohya sd-scripts {args.commit[:12]} ({kver}); lorabuild {git_head()} ({machine()})"]
    return head + table(["", "kohya", "lorabuild cold", "lorabuild / kohya"], rows) + "\n\n" + "\n".join(notes + status)


def git_head() -> str:
    proc = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown commit"


def run_kohya(args, ckpt: Path, data: Path, tmp: Path) -> tuple[Case, Path | None, str]:
    case = Case("kohya")
    try:
        py, tree = kohya_setup.ensure(args.kohya_src, args.kohya_home, args.commit, args.torch)
    except kohya_setup.SetupError as e:
        case.error = f"kohya could not be installed: {e}"
        print(f"kohya_side: {case.error}", file=sys.stderr, flush=True)
        return case, None, "not installed"
    tok = tmp / "tokenizers" / "openai_clip-vit-large-patch14"
    shutil.copytree(sd15_folder() / "tokenizer", tok)
    out = tmp / "kohya-out"
    print("kohya_side: running kohya train_network.py", flush=True)
    watch(case, kohya_cmd(tree, py, ckpt, data, out, tok, args.size, args.steps, args.gradient_checkpointing,
                          args.unet_only), tree, {})
    return case, out / "kohya.safetensors", kohya_setup.versions(py)


def run_lorabuild(args, root: Path) -> tuple[Case, Path | None]:
    print("kohya_side: running doit train:bench", flush=True)
    # --fresh-tuning: a machine lorabuild has never trained on, which times its CPU convolution
    # paths in step 1; by default the machine's own choices (~/.cache/lorabuild/tuning), as every
    # workspace after a user's first one has them
    env = {"LORABUILD_TUNING_DIR": str(root.parent / "tuning")} if args.fresh_tuning else {}
    case = watch(Case("lorabuild"), [sys.executable, "-m", "doit", "train:bench"], root, env)
    saved = sorted((root / "output").rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)  # the final save
    return case, (saved[-1] if saved else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 px, 3 steps: a smoke test of the harness")
    ap.add_argument("--size", type=int, choices=sorted(UNET_GFLOP), default=None, help="px (default 512, quick 256)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 8, quick 3)")
    ap.add_argument("--kohya-src", default=os.environ.get("LORABUILD_KOHYA_SRC"),
                    help="a clone of kohya-ss/sd-scripts (folder) or its git URL; needed for the first install")
    ap.add_argument("--kohya-home", type=Path, default=kohya_setup.HOME, help="kohya's venv and source (%(default)s)")
    ap.add_argument("--commit", default=kohya_setup.COMMIT, help="kohya commit (%(default)s)")
    ap.add_argument("--torch", nargs="+", default=kohya_setup.TORCH, help="kohya's torch (%(default)s)")
    ap.add_argument("--quiet-below", type=float, default=None, help="before each case wait for load average < this")
    ap.add_argument("--quiet-wait", type=float, default=1800, help="longest wait for a quiet machine, s")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="both tools with gradient checkpointing")
    ap.add_argument("--unet-only", action="store_true", help="text encoder frozen (kohya --network_train_unet_only)")
    ap.add_argument("--fresh-tuning", action="store_true",
                    help="lorabuild times its CPU convolution paths in this run (a machine it never ran on)")
    ap.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    try:
        import psutil  # noqa: F401
    except ImportError:
        sys.exit("kohya_side: needs psutil (pip install psutil, or lorabuild's 'bench' extra)")
    args.size = args.size or (256 if args.quick else 512)
    args.steps = args.steps or (3 if args.quick else 8)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (s/step leaves out step 1)")
    ckpt = single_file()
    rates = [sgemm_gflops()]
    with tempfile.TemporaryDirectory(dir=os.environ.get("LORABUILD_BENCH_TMP")) as t:
        tmp, root = Path(t), Path(t) / "ws"
        settings = {"base_model": str(ckpt), "network": {"train_text_encoder": not args.unet_only},
                    "train": {"max_steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing}}
        data = sd15_project(root, 8, args.size, settings).parent
        loads = [wait_quiet(args.quiet_below, args.quiet_wait)]
        kcase, kfile, kver = run_kohya(args, ckpt, data, tmp)
        loads.append(wait_quiet(args.quiet_below, args.quiet_wait))
        lcase, lfile = run_lorabuild(args, root)
        loads.append(load())
        rates.append(sgemm_gflops())
        modules = same_modules(lora_shapes(kfile), lora_shapes(lfile)) if not kcase.error else "not compared"
        k = figures(kcase, KOHYA_STEP, "caching latents", BAR)
        lb = figures(lcase, STEP, "latents:bench", re.compile(r"latents:bench:\s+" + BAR.pattern))
        text = report(args, k, lb, kcase, lcase, modules, rates, loads, kver)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = [c.save(args.kohya_home.parent / "logs", stamp) for c in (kcase, lcase)]
    title = f"kohya sd-scripts side by side (issue 26){' (--quick)' if args.quick else ''}, {datetime.date.today()}"
    print(f"\n## {title}\n\n{text}\n\nkohya_side: full output in {', '.join(str(p) for p in logs)}")
    if args.append:
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(f"\n## {title}\n\n{text}\n")
    if kcase.error or kcase.rc or lcase.rc:
        sys.exit(1)


if __name__ == "__main__":
    main()
