#!/usr/bin/env bash
# The GPU checks of issue 20 as one script, one markdown table (plus each check's full output).
#
#   bash benchmarks/gpu_check.sh              # one H100/H200: finishes inside 9 minutes
#   bash benchmarks/gpu_check.sh --dry-run    # the same checks CPU-sized (CI runs this)
#
# Checks, each against the baseline its script names, measured in the same run:
#   aggregation      benchmarks/aggregation.py --preset llama7b: every method, ms per round, against
#                    the naive dense forms (and the bandwidth floor the script reports)
#   dp_overhead      benchmarks/dp_overhead.py --device cuda: Opacus hooks and ghost vs no DP
#                    (target <= 1.15x)
#   client_precision benchmarks/client_precision.py --preset llama7b: a 4-bit vs bf16 vs fp32
#                    client round on a 7B-shaped random Llama (peak memory, samples/s)
#   client_sharing   benchmarks/client_sharing.py --device cuda: clients sharing one GPU
# Output: $OUT/gpu_check.md (or benchmarks/results/gpu_check.md without $OUT) and one log per check.
# GPU_CHECK_ONLY=aggregation,client_precision runs only the named checks. A check whose script
# exits 1 without a traceback ran and reported a target not met (aggregation does at small sizes);
# the script itself fails (exit 1) only when a check crashed or timed out.
#
# What the GPU machine lacks is installed from wheels carried with the checkout: put them in
# ./wheelhouse (e.g. `pip download -d wheelhouse bitsandbytes==0.50.2 lm-eval==0.4.13` on a machine
# with the index) and carry it; nothing is fetched from the network.
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEST="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$DEST"
PY="${PYTHON:-python}"
export COLUMNS=160 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export FLWR_TELEMETRY_ENABLED=0

if [[ $DRY == 0 ]]; then
  WHEELS="${WHEELS:-$ROOT/wheelhouse}"
  for module in bitsandbytes fedpeft; do
    if ! "$PY" -c "import $module" 2>/dev/null; then
      [[ -d "$WHEELS" ]] || { echo "gpu_check: $module missing and no $WHEELS to install it from" >&2; exit 2; }
      if [[ $module == fedpeft ]]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e . || exit 2
      else
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$module" || exit 2
      fi
    fi
  done
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "gpu_check: no CUDA device (use --dry-run on a CPU)" >&2; exit 2; }
  DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
  CHECKS=(
    "aggregation|150|$PY benchmarks/aggregation.py --preset llama7b --device cuda --dense-layers 4"
    "dp_overhead|90|$PY benchmarks/dp_overhead.py --device cuda --batch 32 --seq-len 128 --steps 30"
    "client_precision|180|$PY benchmarks/client_precision.py --preset llama7b --device cuda --batch 4 --seq-len 512 --steps 8 --json $DEST/client_precision.json"
    "client_sharing|100|$PY benchmarks/client_sharing.py --device cuda --clients 8 --rounds 4"
  )
else
  DEVICE="CPU (dry run)"
  export OMP_NUM_THREADS=1
  CHECKS=(
    "aggregation|120|$PY benchmarks/aggregation.py --layers 2 --dim 256 --repeats 1 --fair-iters 5"
    "dp_overhead|120|$PY benchmarks/dp_overhead.py --device cpu --shape minilm --batch 4 --seq-len 16 --steps 2 --examples 64"
    "client_precision|120|$PY benchmarks/client_precision.py --preset small --layers 1 --device cpu --batch 2 --seq-len 32 --steps 1 --json $DEST/client_precision.json"
    "client_sharing|240|$PY benchmarks/client_sharing.py --device cpu --clients 2 --model tiny_bert --rounds 3 --local-steps 1 --batch 4"
  )
fi

MD="$DEST/gpu_check.md"
{
  echo "# GPU check ($DEVICE, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  echo "| check | status | wall s | result (last line of its output) |"
  echo "|---|---|---|---|"
} >"$MD"
FAILED=0
SELECTED=()
for check in "${CHECKS[@]}"; do
  name="${check%%|*}"
  if [[ -z "${GPU_CHECK_ONLY:-}" || ",${GPU_CHECK_ONLY}," == *",$name,"* ]]; then
    SELECTED+=("$check")
  fi
done
[[ ${#SELECTED[@]} -gt 0 ]] || { echo "gpu_check: GPU_CHECK_ONLY=$GPU_CHECK_ONLY names no check" >&2; exit 2; }
for check in "${SELECTED[@]}"; do
  IFS="|" read -r name limit command <<<"$check"
  log="$DEST/$name.log"
  start=$(date +%s)
  timeout "$limit" bash -c "$command" >"$log" 2>&1
  code=$?
  wall=$(($(date +%s) - start))
  status=ok
  if [[ $code == 124 ]]; then
    status="timeout (${limit} s)" FAILED=1
  elif [[ $code == 1 ]] && ! grep -q Traceback "$log"; then
    status="target not met"
  elif [[ $code != 0 ]]; then
    status="exit $code" FAILED=1
  fi
  last=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '|' '/' | cut -c1-200)
  echo "| $name | $status | $wall | $last |" >>"$MD"
  echo "gpu_check: $name $status in ${wall}s" >&2
done
if [[ -f "$DEST/client_precision.json" ]]; then
  "$PY" - "$DEST/client_precision.json" >>"$MD" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    mem = r["memory_vs_fp32"]
    print(f"| client round {r['mode']} | ok | - | {r['samples_per_s']:.2f} samples/s "
          f"({r['speed_vs_fp32']:.2f}x fp32), peak {r['peak_gib']:.2f} GiB"
          + ("" if mem is None else f" ({mem:.2f}x fp32)") + " |")
EOF
fi
{
  echo
  for check in "${SELECTED[@]}"; do
    IFS="|" read -r name _ command <<<"$check"
    echo "## $name"
    echo
    echo "\`$command\`"
    echo
    echo '```'
    cat "$DEST/$name.log"
    echo '```'
    echo
  done
} >>"$MD"
echo "gpu_check: table in $MD" >&2
exit $FAILED
