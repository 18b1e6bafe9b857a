#!/usr/bin/env bash
# Every CUDA kernel against the reference interpreter, then SD-sized op timings.
source scripts/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "nvidia libs: $DIFFUSE_CUDA_LIBS"; ls -d $DIFFUSE_CUDA_LIBS | head -20
$DIFFUSE cuda-selftest --benchmark "$@" 2>&1 | tee $OUT/selftest.log
