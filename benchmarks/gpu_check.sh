#!/usr/bin/env bash
# The checks no CPU machine can do, as one script for a session that is lent a CUDA GPU
# (run it from the repository root after the README's set-up, with a CUDA build of torch and
# `pip install -e '.[quant]'`; on a machine that cannot reach PyPI, `bash benchmarks/gpu_wheels.sh`
# first, where it can, and carry the .whl/ folder it writes: this script installs it beside the
# machine's own torch). Nothing is downloaded: the real SD3 Medium architecture is built
# with random weights on the GPU (--model random:sd3-medium). Under 10 minutes on one H100-class GPU:
# each part has its own time limit (90 + 360 + 110 s), so one slow part still leaves the others'
# figures, and the speed modes print a row each as they end, the most needed first.
#   0. the offload / 8-bit T5 / compile / quantization / step-cache / fused-attention tests, on the GPU;
#   1. every speed mode (benchmarks/speed_modes.py) on the hosted page's request at 1024²:
#      exact, the defaults (compiled per block + fused QKV, VAE decoder compiled), whole-graph compile,
#      CUDA graphs, int8, fp8, step cache fast/faster, and the compile warmed up at two sizes (graphs
#      for any size): time, speed-up, peak memory, PSNR against exact, a row as each mode ends;
#   2. latency and peak GPU memory per memory mode at 1024² (offloads, T5 8-bit, tiling).
set -uo pipefail
python=${PYTHON:-python3}
if [ -d .whl ]; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sd3-gpu-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/sd3-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 1
# -p no:warnings: the machine's own torch and transformers may warn where CI's versions do not, and
# the suite turns warnings into errors; what this run checks is the GPU code paths.
SD3_TEST_DEVICE=cuda timeout 90 "$python" -m pytest -q -p no:cacheprovider -p no:warnings \
    tests/pipelines/test_offload_and_quantization.py tests/pipelines/test_step_cache.py \
    tests/pipelines/test_transformer_quantization.py tests/pipelines/test_joint_attention.py
timeout 360 "$python" benchmarks/speed_modes.py --model random:sd3-medium --size 1024 --steps 25 --repeats 2
timeout 110 "$python" benchmarks/memory_modes.py --model random:sd3-medium --sizes 1024 --steps 4
