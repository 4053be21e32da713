#!/usr/bin/env bash
# One-shot GPU benchmark for the device tool: the full suite on CUDA, results under $OUT.
#
# The device image has torch, transformers 5.17, psutil, opencv, pillow, numpy but no
# diffusers / omegaconf. Bring them as wheels (here, once, in the repo root; /.whl/ is ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 transformers==5.23.0 \
#     huggingface_hub==2.4.0 tokenizers==0.23.3
# (pin what `.venv/bin/python -m pip list` shows here). Since assets/toy was added the tracked tree
# is ~57 MB of the 64 MiB that travel, and those wheels are ~20 MB: leave out transformers,
# huggingface_hub and tokenizers and use the image's transformers 5.17 (the call refuses a
# tree over the limit). Then call the device tool with
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
# and, as a second call, the channels_last A/B behind assemble_backbone's choice (finding 5):
#   run(command="bash bench/gpu.sh memory-format", carry=[".whl"], timeout_s=600)
# Nothing is installed into the machine's Python: the wheels are unpacked to /tmp/site from
# the local folder (--no-index) and put on PYTHONPATH. The tiny end-to-end section is a CPU
# goal and needs dlib, so it is not run here. Copy $OUT/bench.log into bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt" || true
if [[ "${1:-}" == "memory-format" ]]; then
  shift
  python3 bench/memory_format.py --device cuda --dtype bfloat16 --resolution 512 "$@" 2>&1 | tee "$OUT/memory-format.log"
  exit
fi
python3 bench/run.py --suite full --device cuda --sections train,recipe,preview --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
