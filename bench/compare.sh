#!/usr/bin/env bash
# moz-lab against its PyTorch reference on the same machine, in one command:
#   1. the NLL of a text under a freshly trained checkpoint agrees (to 1e-4 nats/byte),
#   2. training tokens/s of lab-small (dense and MoZ), Rust then PyTorch eager.
# Needs: a Rust toolchain (or BIN=prebuilt binary), and python3 with torch, numpy and safetensors (PYTHON=... to pick one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-5}
THREADS=${THREADS:-$(nproc)}
# BIN=path/to/moz-lab runs a prebuilt binary (no cargo needed); else build it here.
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release/moz-lab
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== NLL agreement (moz-lab eval vs bench/torch_ref.py nll, float64)"
$BIN run experiments/quickstart.toml --variant moz --steps 30 --runs-dir "$TMP/runs" --quiet >/dev/null
tail -c 20000 data/tinyshakespeare.txt > "$TMP/text.txt"
rust=$($BIN eval --checkpoint "$TMP/runs/quickstart/moz" --text "$TMP/text.txt" --dtype f64)
torch=$($PY bench/torch_ref.py nll --checkpoint "$TMP/runs/quickstart/moz/checkpoint" --text "$TMP/text.txt")
echo "moz-lab: $rust"
echo "torch:   $torch"
$PY - "$rust" "$torch" <<'PYEOF'
import sys
a = float(sys.argv[1].split()[1]); b = float(sys.argv[2].split()[1])
print(f"|difference| = {abs(a - b):.2e} nats/byte -> {'OK' if abs(a - b) <= 1e-4 else 'MISMATCH'}")
sys.exit(0 if abs(a - b) <= 1e-4 else 1)
PYEOF

echo "== training tokens/s, lab-small, $THREADS threads"
RAYON_NUM_THREADS=$THREADS $BIN bench --config lab-small --variants dense,moz --steps "$STEPS" --warmup 1
for v in dense moz; do
  $PY bench/torch_ref.py bench --config lab-small --variant $v --steps "$STEPS" --warmup 1 --threads "$THREADS"
done
