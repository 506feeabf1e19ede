#!/usr/bin/env bash
# For a GPU machine that cannot reach PyPI but brings its own CUDA build of torch, as the machines
# lent to this project do (Python 3.12, torch 2.11+cu130, with transformers, accelerate, peft,
# safetensors and pytest, without diffusers or torchao): run here, where PyPI answers, to download
# into .whl/ the wheels that benchmarks/gpu_check.sh needs beyond those, at the versions this
# checkout's environment runs (what CI tested), for that machine's Python. gpu_check.sh installs them
# from .whl/ when the folder is there (carry it: it is git-ignored).
#   bash benchmarks/gpu_wheels.sh          # for Python 3.12; ~13 MB
#   bash benchmarks/gpu_wheels.sh 3.11     # for another Python
# The benchmarks and GPU tests load models through server/runtime.py, which needs none of the web
# stack, so the wheels fit beside the checkout in a 64 MiB transfer. T5 in 8-bit needs
# bitsandbytes (43 MB): not carried; its memory mode then reports itself unavailable.
set -euo pipefail
python_version=${1:-3.12}
python=${PYTHON:-.venv/bin/python}
names=(diffusers torchao pydantic pydantic_core pydantic-settings python-dotenv annotated-types
    typing-inspection platformdirs)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl
mkdir .whl
for name in "${names[@]}"; do
    version=$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "$python_version" "${platforms[@]}" --dest .whl "$name==$version"
done
ls .whl
# What a copy of the checkout carries with them (a remote runner may cap it, at 64 MiB here).
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
wheels=$(du -sb .whl | cut -f1)
echo "wheels $((wheels / 2**20)) MiB + tracked files $((tracked / 2**20)) MiB = $(((tracked + wheels) / 2**20)) MiB"
