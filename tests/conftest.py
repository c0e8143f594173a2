"""Shared fixtures: a demo workspace made by ``lorabuild init`` and built once per session.

Every test that needs a built project gets its own copy of that workspace (cache, doit
database and outputs included), so tests stay independent and the cold build is paid once.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

STAGES = ("resize", "bucket", "latents", "textemb", "train", "sample")  # the demo's (no tagger)
MAX_WORKERS = 4  # pytest -n auto (pyproject addopts): each worker builds its own demo once

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one torch thread each (inherited by every doit/lorabuild
    # process a test starts). Two threads per worker on two cores oversubscribe them many times over.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
# The CPU convolution choices (lorabuild/cpuconv.py) are per machine, in the user's cache: the
# suite keeps its own, one file for all its workers (so every workspace a test builds makes the same
# choices, as on a user's machine) and none of it in the home folder.
if not os.environ.get("LORABUILD_TUNING_DIR"):
    import tempfile
    import uuid

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
    os.environ["LORABUILD_TUNING_DIR"] = str(Path(tempfile.gettempdir()) / f"lorabuild-test-tuning-{run_id}")
# The suite's demo: the random tiny-sd1 model on 16 red-circle / blue-square pictures, fast and
# with aspect ratios for bucketing. ``lorabuild init`` ships its own demo (projects/demo.yaml);
# tests that need the shipped one call ``lorabuild init`` themselves.
TINY_DEMO = Path(__file__).parent / "data" / "tiny_demo"


class WS:
    """A workspace under test, driven through the real CLIs."""

    def __init__(self, root: Path):
        self.root = root

    def doit(self, *args: str, build: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "LORABUILD_BUILD": build}
        proc = subprocess.run(
            [sys.executable, "-m", "doit", *args], cwd=self.root, env=env, capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def lorabuild(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lorabuild", *args], cwd=self.root, capture_output=True, text=True
        )

    def report(self, stage: str, project: str = "demo") -> dict:
        return json.loads((self.root / "cache" / "reports" / project / f"{stage}.json").read_text())

    def manifest(self, stage: str, project: str = "demo") -> dict:
        return json.loads((self.root / "cache" / "manifests" / project / f"{stage}.json").read_text())

    def ran(self, build: str, project: str = "demo") -> set[str]:
        """The stages whose last report was written by the doit invocation ``build``."""
        out = set()
        for stage in ("tag", *STAGES):
            path = self.root / "cache" / "reports" / project / f"{stage}.json"
            if path.exists() and json.loads(path.read_text())["build"] == build:
                out.add(stage)
        return out

    @property
    def yaml_path(self) -> Path:
        return self.root / "projects" / "demo.yaml"

    def edit(self, fn) -> None:
        """Change the demo project: ``fn`` receives the parsed YAML and edits it in place."""
        doc = yaml.safe_load(self.yaml_path.read_text())
        fn(doc)
        self.yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    @property
    def data(self) -> Path:
        return self.root / "projects" / "demo"

    def shorten(self) -> None:
        """Each of the demo's 16 images once per epoch instead of 10 times: 5 steps an epoch (batches of 4
        within each bucket), not 40; the images and their caches stay the ones built: only training gets shorter."""
        folders = sorted(p.name for p in self.data.iterdir() if p.is_dir())
        self.edit(lambda d: d.update(dataset={"concepts": [{"path": f"demo/{f}", "repeats": 1} for f in folders]}))


def init_workspace(root: Path) -> WS:
    """``lorabuild init root`` through the real CLI, then the suite's tiny demo in place of the shipped one."""
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "init", str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(root / "projects" / "demo")
    shutil.copytree(TINY_DEMO / "demo", root / "projects" / "demo")
    shutil.copy2(TINY_DEMO / "demo.yaml", root / "projects" / "demo.yaml")
    return WS(root)


@pytest.fixture(scope="session")
def built_demo(tmp_path_factory) -> WS:
    ws = init_workspace(tmp_path_factory.mktemp("template") / "ws")
    ws.cold = ws.doit("sample:demo", build="cold")
    return ws


def copy_workspace(src: WS, dst: Path) -> WS:
    """A private copy of a workspace (timestamps kept, so doit sees it up to date)."""
    shutil.copytree(src.root, dst, symlinks=True)
    return WS(dst)


@pytest.fixture(scope="session")
def quick_demo(built_demo, tmp_path_factory) -> WS:
    """The built demo retrained for one epoch only: incremental tests retrain in seconds."""
    ws = copy_workspace(built_demo, tmp_path_factory.mktemp("quick") / "ws")
    ws.edit(lambda d: d["train"].update(epochs=1))
    ws.doit("sample:demo", build="quick")
    return ws


@pytest.fixture
def demo(quick_demo, tmp_path) -> WS:
    """A private copy of the built one-epoch demo workspace."""
    return copy_workspace(quick_demo, tmp_path / "ws")


@pytest.fixture(scope="module")
def tiny_unet_te():
    """A two-level SD-style UNet (4 Transformer2D blocks) and a two-layer CLIP text encoder, in memory."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77))
    return unet, te


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_sessionfinish(session):
    """A worker hands its figures to the controlling process, which prints them all."""
    from figures import COUNTS, FIGURES, OUTCOMES

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["figures"] = json.dumps([FIGURES, dict(COUNTS), dict(OUTCOMES)])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from figures import COUNTS, FIGURES, OUTCOMES

    figures, counts, outcomes = json.loads(getattr(node, "workeroutput", {}).get("figures", "[[], {}, {}]"))
    FIGURES.extend(figures)
    COUNTS.update(counts)
    OUTCOMES.update(outcomes)


def pytest_terminal_summary(terminalreporter):
    from figures import COUNTS, FIGURES, outcome_lines

    if FIGURES or COUNTS or outcome_lines():
        terminalreporter.section("fault and bad-input figures")
        for line in FIGURES + outcome_lines():
            terminalreporter.write_line(line)
        for kind, n in sorted(COUNTS.items()):
            terminalreporter.write_line(f"bad input: {n} {kind}, each a result or a clear error, no traceback")
