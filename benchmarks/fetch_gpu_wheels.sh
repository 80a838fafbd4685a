#!/usr/bin/env bash
# Wheels of the Python packages the GPU machines lack (they have torch, transformers, accelerate, peft,
# safetensors, numpy, pandas, pyarrow, psutil, pytest but no hydra, omegaconf, lm-eval, datasets), pinned to the
# versions this project is tested with, into .whl/ (git-ignored) for benchmarks/gpu_check.sh to install there
# offline. Run here, where PyPI is reachable: bash benchmarks/fetch_gpu_wheels.sh   (~10 MB, well under the 64 MiB
# a carried checkout may take). wandb is left out (20 MB; tracking imports it only when a run logs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
# pure Python: the wheel from PyPI, or one built here from the sdist (antlr4 4.9.3, sqlitedict, word2number)
PURE=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 lm-eval==0.4.13 datasets==5.2.0
      evaluate==0.4.6 dill==0.4.1 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1
      tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 rouge-score==0.1.2 nltk==3.10.4
      defusedxml==0.7.1 sqlitedict==2.1.0 word2number==1.1 more-itertools==11.2.1)
"$PY" -m pip wheel --no-deps -q -w .whl "${PURE[@]}"
# tagged per Python version: the GPU image's Python 3.12
"$PY" -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl multiprocess==0.70.19
du -sh .whl && ls .whl
