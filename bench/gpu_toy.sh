#!/usr/bin/env bash
# Toy pretraining on a lent GPU (docs/TOY.md): the UNet + text encoder stage, from scratch (or on from
# the shipped weights, CONTINUE=1), on the shipped VAE, for MINUTES minutes at batch BATCH; the EMA
# weights come back under $OUT.
#
# The shipped backbone is limited by this stage (bench/RESULTS-toy.md, 1b-1c): on the 2-core CPU it
# got 1 550 steps of batch 64 in an hour. The device image has torch and transformers but no
# diffusers / omegaconf; bring those as wheels, once, here in the repo root (the tracked tree is
# ~57 MB of the 64 MiB that travel, so only the small ones; /.whl-toy/ is ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl-toy diffusers==0.42.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3
# then call the device tool with
#   run(command="bash bench/gpu_toy.sh", carry=[".whl-toy"], timeout_s=600)
# (defaults: MINUTES=6, BATCH=256, IDENTITY_TOKENS=0; the data stage renders first, about a minute
# on 16 cores). IDENTITY_TOKENS=0.5 trains with identity-bearing class words in half the captions
# (docs/TOY.md, "Identity tokens"); bench/toy_reach.py then says whether a token can carry a face.
# CONTINUE=1 starts from the shipped assets/toy weights (`--continue-from assets/toy`) instead of
# from scratch: MINUTES more on top of the steps already shipped. HEAD_WIDTH=32 (the default) builds
# the UNet with attention heads of width 32 (docs/TOY.md, "Attention heads"); HEAD_WIDTH= (empty)
# keeps the first runs' 32 heads of width 2-4 per layer. FINE_ATTENTION=1 adds cross-attention at the
# 16 x 16 latent level (docs/TOY.md, "Attention at the finest level"; joined as an exact no-op when
# continued). EXTRA holds more pretraining flags, e.g. EXTRA="--min-snr 5 --feature-weight 6", the
# shipped weights' last stretch (bench/RESULTS-toy.md, 2d).
# What comes back (7 files; the device tool returns at most 8): unet/ (fp16 tensors on disk: the
# fp32 file is over the 16 MiB a returned file may have; it loads as the preset's dtype),
# text_encoder/, pretrain.json and the logs, copied on exit. The backbone stage exports only when
# its time budget is over, so a command killed at the device tool's limit returns no weights: keep
# MINUTES well inside the 10-minute command limit (data rendering and latent encoding come first).
# To use them, replace the files of assets/toy/unet and assets/toy/text_encoder with them, then
# look (bench/toy_look.py) and measure (bench/toy_caps.py, bench/toy_world.py) before shipping.
# A CPU dry run of the same steps (renders the data for about 8 minutes on 2 cores):
#   DEVICE=cpu MINUTES=0.2 BATCH=8 OUT=/tmp/gt RUN=/tmp/gt-run bash bench/gpu_toy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu-toy}"
RUN="${RUN:-/tmp/toy-pretrain}"
MINUTES="${MINUTES:-6}"
BATCH="${BATCH:-256}"
IDENTITY_TOKENS="${IDENTITY_TOKENS:-0}"  # share of captions with an identity-bearing class word (docs/TOY.md)
HEAD_WIDTH="${HEAD_WIDTH-32}"
HEAD_ARGS=()
[[ -n "$HEAD_WIDTH" ]] && HEAD_ARGS=(--head-width "$HEAD_WIDTH")
FINE_ARGS=()
[[ "${FINE_ATTENTION:-0}" == 1 ]] && FINE_ARGS=(--fine-attention)
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
CONTINUE_ARGS=()
[[ "${CONTINUE:-0}" == 1 ]] && CONTINUE_ARGS=(--continue-from assets/toy)
DEVICE="${DEVICE:-cuda}"
THREADS="${THREADS:-$(nproc)}"
PY="${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl-toy/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-toy/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$OUT" "$RUN"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
[[ -d "$RUN/vae" ]] || cp -r assets/toy/vae "$RUN/vae"  # the shipped VAE: the backbone stage trains none
[[ -d "$RUN/image_encoder" ]] || cp -r assets/toy/image_encoder "$RUN/image_encoder"  # for identity tokens

send_back() {  # the export, if the backbone stage got to write one
  [[ -f "$RUN/unet/diffusion_pytorch_model.safetensors" ]] || return 0
  mkdir -p "$OUT/unet" "$OUT/text_encoder"
  cp "$RUN/unet/config.json" "$OUT/unet/"
  cp "$RUN/text_encoder/"* "$OUT/text_encoder/"
  cp "$RUN/pretrain.json" "$OUT/" 2>/dev/null || true
  "$PY" - "$RUN/unet/diffusion_pytorch_model.safetensors" "$OUT/unet/diffusion_pytorch_model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
save_file({k: v.half() for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])
PY
  ls -l "$OUT" "$OUT/unet" "$OUT/text_encoder"
}
trap send_back EXIT
"$PY" -m studio toy pretrain --out "$RUN" --stage data --threads "$THREADS" 2>&1 | tee "$OUT/data.log"
"$PY" -m studio toy pretrain --out "$RUN" --stage backbone --minutes "$MINUTES" --device "$DEVICE" \
  --batch "$BATCH" --identity-tokens "$IDENTITY_TOKENS" --threads "$THREADS" ${HEAD_ARGS[@]+"${HEAD_ARGS[@]}"} ${CONTINUE_ARGS[@]+"${CONTINUE_ARGS[@]}"} \
  ${FINE_ARGS[@]+"${FINE_ARGS[@]}"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} 2>&1 | grep --line-buffered -v "Writing model shards" | tee "$OUT/backbone.log"
