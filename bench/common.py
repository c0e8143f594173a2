"""Shared by the bench scripts: machine facts, Markdown tables, RESULTS.md, synthetic
projects, a full-size SD 1.5 model with random weights, and runs measured in a fresh
process (wall clock and peak RSS)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# the full-size random model is 4.3 GB: written once, kept between runs (override with LORABUILD_BENCH_MODELS)
MODELS = Path(os.environ.get("LORABUILD_BENCH_MODELS", Path(tempfile.gettempdir()) / "lorabuild-bench-models"))
GIB = 2**30


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def load() -> str:
    """The 1/5/15-minute load average: the cores are shared, so a figure taken under load says so."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def publish(title: str, text: str, loads: list[str] | None = None) -> None:
    """Print a result and append it, with the machine and the load averages seen while
    measuring (start, end), to bench/RESULTS.md."""
    seen = f"; load average (1/5/15 min) while measuring: {', '.join(loads)}" if loads else ""
    block = f"\n## {title}\n\n{machine()}{seen}\n\n{text}\n"
    print(block)
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(block)


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def measured(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS in GiB, output) of ``cmd`` in a fresh process.

    ``os.wait4`` reports that one child's own peak RSS (ru_maxrss, KiB on Linux), unlike
    RUSAGE_CHILDREN, which keeps the largest of every child this process has waited for.
    """
    with tempfile.TemporaryFile("w+") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{text[-4000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / GIB, text


def median(values) -> float:
    return statistics.median(values)


# --- synthetic projects ---------------------------------------------------------------

SIZES = [(128, 128), (96, 160), (160, 96), (112, 144)]


def make_image(path: Path, i: int, scale: float = 1.0, square: bool = False) -> None:
    """A deterministic picture of a few coloured blobs (and its caption beside it): one of four
    aspect ratios, or square, ``scale`` × 128 px across."""
    from PIL import Image, ImageDraw

    rng = random.Random(i)
    w, h = (int(s * scale) for s in SIZES[0 if square else i % len(SIZES)])
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    r = int(20 * scale)
    for _ in range(3):
        x, y = rng.randrange(w), rng.randrange(h)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    img.save(path)
    path.with_suffix(".txt").write_text(f"blob, color {i % 7}, shape {i % 5}")


def workspace(root: Path, n: int, name: str = "bench", settings: dict | None = None, **image) -> Path:
    """A workspace (``lorabuild init``) with one project of ``n`` synthetic images in one concept
    (``image``: ``make_image``'s scale / square); ``settings`` ({section: {key: value}}) are
    merged over the defaults (tiny model, 128 px buckets). Returns the concept folder."""
    run([sys.executable, "-m", "lorabuild", "init", str(root)], cwd=root.parent)
    concept = root / "projects" / name / "1_blob"
    concept.mkdir(parents=True)
    for i in range(n):
        make_image(concept / f"img{i:05d}.png", i, **image)
    doc = yaml.safe_load((root / "projects" / "demo.yaml").read_text())
    # the demo is a lesson on builtin:world-sd1 (tag dropout, regularization images): the benches
    # measure the tiny model, with fixed captions, as before
    doc["base_model"] = "builtin:tiny-sd1"
    doc["captions"] = {"prepend": []}
    doc["train"].pop("prior_loss_weight", None)
    doc["dataset"] = {"dirs": [name]}
    doc["bucket"] = {"resolution": 128, "min_reso": 64, "max_reso": 256, "step": 64}
    doc["resize"] = {"max_side": 256}
    doc["train"].update(epochs=1, batch_size=16, save_every_n_epochs=None)
    doc.pop("sample", None)
    write_settings(root, name, doc, settings or {})
    return concept


def write_settings(root: Path, name: str, doc: dict | None = None, settings: dict | None = None) -> None:
    """Merge ``settings`` ({section: {key: value}} or {key: value}) into projects/<name>.yaml."""
    f = root / "projects" / f"{name}.yaml"
    doc = doc if doc is not None else yaml.safe_load(f.read_text())
    for k, v in (settings or {}).items():
        if isinstance(v, dict):
            doc.setdefault(k, {}).update(v)
        else:
            doc[k] = v
    f.write_text(yaml.safe_dump(doc, sort_keys=False))


# --- full-size SD 1.5 with random weights ----------------------------------------------

def build_sd15(model_cls: str, config_file: Path, seed: int = 0):
    """One SD 1.5 component from the shipped full-size config, with the classes' own random
    initialisation (seeded): the real architecture and cost, no downloaded weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = json.loads(config_file.read_text())
    if model_cls == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[model_cls]
    return cls.from_config(cfg)


def sd15_folder() -> Path:
    """A diffusers folder with the real SD 1.5 architecture (lorabuild's shipped configs) and
    random weights, fp32 safetensors; written once under MODELS and reused."""
    from lorabuild import models

    folder = MODELS / "sd15-random"
    if (folder / "done").is_file():
        return folder
    models.offline()
    tmp = MODELS / f"sd15-random.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = models.CONFIGS_DIR / "sd1"
    shutil.copytree(cfg, tmp)
    shutil.copytree(models.TOKENIZER_DIR, tmp / "tokenizer")
    for part in ("unet", "vae", "text_encoder"):
        print(f"bench: building a random full-size SD 1.5 {part} in {tmp}", flush=True)
        m = build_sd15(part, cfg / part / "config.json")
        m.save_pretrained(str(tmp / part), safe_serialization=True)
        del m
    models._add_slow_tokenizer_files(tmp)
    (tmp / "done").write_text("random weights, seed 0\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def sd15_project(root: Path, n: int, size: int, settings: dict | None = None) -> Path:
    """A workspace whose project trains the random full-size SD 1.5 on ``n`` square images of
    ``size`` px (one bucket), batch 1, one epoch, LoRA dim 32 on kohya's default modules."""
    base = {
        "base_model": str(sd15_folder()),
        "bucket": {"resolution": size, "min_reso": size // 2, "max_reso": size * 2, "step": 64},
        "resize": {"max_side": size},
        "network": {"dim": 32, "alpha": 16, "train_text_encoder": True},
        "train": {"epochs": 1, "batch_size": 1, "learning_rate": 1e-4},
    }
    concept = workspace(root, n, settings=base, scale=size / 128, square=True)
    write_settings(root, "bench", settings=settings)
    return concept


def sd15_models(parts=("unet", "vae", "text_encoder")) -> dict:
    """The SD 1.5 components, loaded the way training loads them (frozen, fp32)."""
    from lorabuild import models

    folder = sd15_folder()
    loaders = {"unet": models.load_unet, "vae": models.load_vae, "text_encoder": models.load_text_encoder}
    out = {p: loaders[p](folder) for p in parts}
    if "text_encoder" in parts:
        out["tokenizer"] = models.load_tokenizer(folder)
    return out


# --- watching a training run -----------------------------------------------------------

STEP = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
BANNER = "LoRA modules"  # train.py prints "train: N LoRA modules ..." once the models are loaded


@dataclass
class Watched:
    wall: float  # process start → exit (or → stopped)
    rss_gib: float  # the process's peak RSS
    banner: float | None  # process start → models loaded and the LoRA built
    steps: list[float]  # process start → optimizer step k done, k = 1, 2, ...
    cpu: list[float]  # the process's CPU seconds (user + system) when step k was seen done
    output: str

    def step_seconds(self) -> list[float]:
        """Each step's wall duration after the first (which also pays for warm-up)."""
        return [b - a for a, b in zip(self.steps, self.steps[1:])]

    def step_cpu(self) -> list[float]:
        """Each step's CPU seconds after the first: what other processes on shared cores
        inflate far less than wall time (an idle 2-core machine does it in about half)."""
        return [b - a for a, b in zip(self.cpu, self.cpu[1:])]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (/proc/<pid>/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch(cmd: list[str], cwd: Path, stop_after: int | None = None, env: dict | None = None) -> Watched:
    """Run ``cmd`` (a build that trains) in a fresh process, timestamping the models-loaded
    banner and every optimizer step from its progress bar; with ``stop_after`` the process
    is terminated once that many steps are done (a few steps say what a step costs).
    Peak RSS comes from ``os.wait4``: that one child's own high-water mark."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    seen: list[str] = []
    banner, steps, cpu = None, [], []
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536).decode("utf-8", "replace")
        if not chunk:
            break
        now = time.perf_counter() - t0
        seen.append(chunk)
        # every piece counts now, the unterminated last one too: tqdm writes an update as "\r" + text,
        # so waiting for the next delimiter dated each step one update late
        for line in re.split(r"[\r\n]", chunk):
            if banner is None and BANNER in line:
                banner = now
            m = STEP.search(line)
            if m and int(m.group(1)) > len(steps):
                k = int(m.group(1)) - len(steps)
                steps += [now] * k
                cpu += [cpu_seconds(proc.pid)] * k
        if stop_after and len(steps) >= stop_after and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = "".join(seen)
    if proc.returncode != 0 and not (stop_after and len(steps) >= stop_after):
        sys.exit(f"{' '.join(cmd)} failed:\n{text[-4000:]}")
    return Watched(wall, usage.ru_maxrss * 1024 / GIB, banner, steps, cpu, text)
