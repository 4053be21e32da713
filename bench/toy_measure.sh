#!/usr/bin/env bash
# Every toy-world measurement of a backbone, one after the other (bench/RESULTS-toy.md says what
# each shows). Run it after new toy weights land in assets/toy (or on a pretraining run's folder
# with RUN=DIR for the benches that take one); each bench's markdown goes to $OUT/NAME.md, its
# progress to $OUT/NAME.log. Smaller sizes for a quick pass: QUICK=1.
#   bash bench/toy_measure.sh                    # the shipped assets/toy, full sizes
#   RUN=/work/toyrun QUICK=1 bash bench/toy_measure.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/toy-measure}"
PY="${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
RUN_ARGS=()
[[ -n "${RUN:-}" ]] && RUN_ARGS=(--run "$RUN")
if [[ -n "${QUICK:-}" ]]; then
  CAPS=(--identities 4) REACH=(--identities 2 --iterations 40) WORLD=(--base-samples 16 --identities 2)
  COMPOSE=(--prompts 4 --seeds 1) BAND=(--identities 2) EXPORT=(--identities 2)
else
  CAPS=(--identities 8) REACH=(--identities 3 --iterations 60) WORLD=(--base-samples 64 --identities 6) COMPOSE=()
  BAND=(--identities 6) EXPORT=(--identities 6)
fi
mkdir -p "$OUT"
step() {  # NAME COMMAND...: markdown to $OUT/NAME.md, stderr to $OUT/NAME.log
  local name=$1; shift
  echo "[$(date +%H:%M:%S)] $name: $*" >&2
  "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
}
step look "$PY" bench/toy_look.py ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} --out "$OUT/look.png"
step leak "$PY" bench/toy_mean_leak.py ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} --out "$OUT/leak.png"
step caps "$PY" bench/toy_caps.py ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} "${CAPS[@]}" --out "$OUT/caps"
step reach "$PY" bench/toy_reach.py ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} "${REACH[@]}" --out "$OUT/reach"
step world "$PY" bench/toy_world.py ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} "${WORLD[@]}" --out "$OUT/world"
step band "$PY" bench/toy_band.py ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} "${BAND[@]}" --out "$OUT/band"
step compose "$PY" bench/toy_compose.py ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} ${COMPOSE[@]+"${COMPOSE[@]}"} --out "$OUT/compose"
if [[ -z "${RUN:-}" ]]; then  # export runs on the shipped weights only
  step export "$PY" bench/toy_export.py "${EXPORT[@]}" --out "$OUT/export"
fi
echo "[$(date +%H:%M:%S)] done: $OUT/*.md" >&2
