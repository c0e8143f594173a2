#!/usr/bin/env bash
# Download, here, the wheels bench/device_run.sh installs on a GPU machine that cannot reach a
# package index (this workplace's H200: Python 3.12, x86-64, with torch, transformers, safetensors,
# huggingface-hub, accelerate, peft, PyYAML, Pillow, numpy, tqdm, attrs, cloudpickle already
# there, but not diffusers, doit or jsonschema). Pure-Python wheels, plus rpds-py (jsonschema's
# one compiled need) and watchdog built for CPython 3.12 manylinux; never torch.
#
#   bench/fetch_wheels.sh [--light] [DEST]      (default bench/wheels, which git ignores)
#
# Also bitsandbytes (8-bit optimizers; one wheel for every CUDA, 41 MiB) and xformers (3 MiB,
# built for torch >= 2.10 on the stable ABI; whether it loads on the device's torch is one of the
# things the run finds out); --light leaves those two out.
#
# Versions are the ones lorabuild is tested with. The total must stay well under the device
# tool's 64 MiB carry limit (the working tree, about 3 MB, travels in the same 64 MiB).
set -euo pipefail
light=0
if [ "${1:-}" = "--light" ]; then light=1; shift; fi
dest=${1:-bench/wheels}
py=${PYTHON:-python3}
mkdir -p "$dest"
wheels=(
  diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2      # diffusers (and doit) need importlib_metadata
  doit==0.37.0                                                  # cloudpickle is there
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  lion-pytorch==0.2.5 prodigyopt==1.1.2 watchdog==7.1.0         # lorabuild's other light needs
)
if [ "$light" = 0 ]; then
  wheels+=(bitsandbytes==0.50.2 xformers==0.0.35)               # packaging and numpy are there
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
ls -l "$dest"
echo "fetch_wheels: $(ls "$dest"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $dest (carry limit 64 MiB with the tree)"
if [ "$total" -gt $((56 * 1024 * 1024)) ]; then
  echo "fetch_wheels: over 56 MiB: with the working tree this would not fit the 64 MiB carry limit" >&2
  exit 1
fi
