#!/usr/bin/env bash
# The GPU check in one shot, on a CUDA machine without network (well inside 10 minutes on one H100):
#   1. install the wheels carried in .whl/ (made here by benchmarks/fetch_gpu_wheels.sh) into /tmp/site
#   2. `pytest -m cuda`: the tests that need a CUDA device (skipped everywhere else)
#   3. benchmarks/gpu_scale.py: Llama-2-7B shapes, random bf16 weights, every stage timed against the plan
# Everything goes to $OUT (default ./gpu_check_out): gpu.txt, pytest_cuda.txt, gpu_scale.{json,md,log}.
# With this workplace's device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the wheels failed" | tee "$OUT/gpu.txt"; exit 1; }
  export PYTHONPATH="$PWD/src:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'devices', torch.cuda.device_count())"; } > "$OUT/gpu.txt" 2>&1
# only the files that hold cuda-marked tests: the others may import dev-only packages not carried here
timeout 240 python3 -m pytest -m cuda -q -rs -p no:cacheprovider $(grep -l "mark.cuda\|pytest.mark.cuda" tests/*.py) \
  > "$OUT/pytest_cuda.txt" 2>&1
echo "pytest -m cuda exit $?" >> "$OUT/pytest_cuda.txt"
timeout 300 python3 benchmarks/gpu_scale.py --out "$OUT" > "$OUT/gpu_scale.log" 2>&1
echo "gpu_scale exit $?" >> "$OUT/gpu_scale.log"
cat "$OUT/gpu.txt"; tail -25 "$OUT/pytest_cuda.txt"; cat "$OUT/gpu_scale.md" 2>/dev/null || tail -30 "$OUT/gpu_scale.log"
