#!/usr/bin/env bash
# which part of a bf16 Chroma step faults on this GPU: each variant in its own process (a CUDA
# fault poisons the process), real widths, 2 double + 4 single blocks, kernels launched blocking
cd "$(dirname "$0")/.."
run() { echo "=== $*"; CUDA_LAUNCH_BLOCKING=1 timeout 120 python3 benchmarks/gpu.py --precisions no_change --steps 2 --depth 2 4 --resolution 512 "$@" 2>&1 | grep -v -E "^frame|Search for|CUDA kernel errors|Warning|deprecate|Loading|Writing|^\s*\^+$" | tail -16; echo "rc=${PIPESTATUS[0]}"; }
run --attention math --bare-first
run --attention efficient
