"""CPU and wall seconds lorabuild adds to every ``doit`` run: import the task module and
build every task of the workspace in the current folder (no doit check, no action).

    cd <workspace> && python <checkout>/bench/graph.py     # PYTHONPATH=<old checkout> for "before"
"""
import sys
import time

c0, t0 = time.process_time(), time.perf_counter()
from pathlib import Path  # noqa: E402

from lorabuild.tasks import make_task_creators  # noqa: E402

tasks = [t for creator in make_task_creators(Path(".")).values() for t in creator()]
deps = sum(len(t.get("file_dep", [])) for t in tasks)
print(f"CPU {time.process_time() - c0:.3f} s, wall {time.perf_counter() - t0:.3f} s, {deps} file dependencies, "
      f"torch imported: {'torch' in sys.modules}")
