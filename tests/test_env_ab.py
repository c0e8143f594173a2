"""bench/env_ab.py (issue 26): variants in their own processes take turns step by step, each with
its own environment, on the shipped world-sd1 model (quick); the table names every variant."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_variants_take_turns_in_their_own_environments():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "env_ab.py"), "--tiny", "--size", "64", "--steps", "2",
                          "--variant", "plain=", "--variant", "kept=LORABUILD_BENCH_KEPT_HEAP=1,OMP_NUM_THREADS=1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    order = [line.split()[3] for line in out.stdout.splitlines() if line.startswith("bench: 64 px")]
    assert order == ["plain", "kept", "plain", "kept"]  # A B A B: the same moments of the machine
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert "LORABUILD_BENCH_KEPT_HEAP=1, OMP_NUM_THREADS=1" in rows["kept"] and "(none)" in rows["plain"]
    assert "1.00×" in rows["plain"]


def test_a_malformed_variant_is_named():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "env_ab.py"), "--variant", "a=FOO", "--variant", "b="],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "'FOO' is not KEY=VALUE" in out.stderr
