#!/bin/bash
# Builds the CUDA release binary and the GPU test binary here (no GPU needed), and puts them
# with the run scripts and the PyTorch reference into /work/main/.carry (git-ignored), which the
# device tool ships. Then, on the GPU machine, one command runs tests + benchmarks:
#
#   device run (carry [".carry"]):  bash .carry/gpu_run.sh [tests] [bench] [ablate] [split] [sweep] [torch] [compile]
#
# (no argument = everything). Logs land in $OUT. Build-side prerequisites: the CUDA toolchain
# env (/work/shared/gpu/setup-cuda-build-env.sh /tmp/cuda && source /tmp/cuda/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
CARRY=${CARRY:-/work/main/.carry}
cargo build --release --features cuda
cargo test --release --features cuda --test gpu --no-run 2>&1 | tee /tmp/gpu-test-build.out
test_bin=$(grep -o 'target-cuda/release/deps/gpu-[0-9a-f]*' /tmp/gpu-test-build.out | tail -1)
[ -n "$test_bin" ] || test_bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/gpu-* | grep -v '\.d$' | head -1)
mkdir -p "$CARRY"
strip -o "$CARRY/moz-lab" "$CARGO_TARGET_DIR/release/moz-lab"
strip -o "$CARRY/gpu-tests" "/work/${test_bin#/work/}"
cp /work/shared/gpu/run-on-gpu.sh bench/gpu_run.sh bench/torch_ref.py "$CARRY/"
ls -la "$CARRY"
