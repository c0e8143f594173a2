#!/usr/bin/env bash
# The prepared GPU run (issue 27), one command on a lent CUDA machine that cannot reach a package
# index: install the wheels carried in bench/wheels (made here by bench/fetch_wheels.sh), then run
# bench/gpu.py --quick on the full-size SD 1.5 and SDXL architectures. Planned at 3 to 4 minutes on an
# H200 (not yet measured; hard limit 420 s, no new case after 270 s), so a shorter rerun
# (--only REGEX) still fits in 15 minutes of device time.
#
#   bash bench/device_run.sh [extra gpu.py options, e.g. --only 'sdxl']
#
# Through this workplace's device tool: run(command="bash bench/device_run.sh", carry=["bench/wheels"],
# timeout_s=480). What comes back in $OUT: RESULTS-gpu.md (the block to append to bench/RESULTS.md),
# rows.jsonl (each measurement as it finished, so a run cut short keeps its rows), log.txt, gpu.txt.
set -uo pipefail
out=${OUT:-/tmp/lorabuild-gpu-out}
mkdir -p "$out"
start=$(date +%s)
limit=${LORABUILD_GPU_LIMIT:-420}
if ls bench/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    bench/wheels/*.whl || { echo "device_run: installing bench/wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "device_run: no bench/wheels/*.whl (run bench/fetch_wheels.sh here and carry bench/wheels)" >&2
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, lorabuild; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'lorabuild', lorabuild.__file__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')" || exit 1
left=$((limit - ($(date +%s) - start)))
# new cases start until 150 s before the limit (the slowest, SDXL, takes under a minute); SIGINT at
# the limit still prints and writes the table of what was measured
timeout --signal=INT --kill-after=20 "$left" python3 bench/gpu.py --quick --deadline $((left - 150)) \
  --work /tmp/lorabuild-gpu-work --out "$out/RESULTS-gpu.md" --jsonl "$out/rows.jsonl" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
