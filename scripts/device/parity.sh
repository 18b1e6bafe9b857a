#!/usr/bin/env bash
# Issue 7's evidence on the GPU machine: every CUDA kernel against the reference, the reference
# fixtures' goldens in fp32 and tf32, and in fp16/bf16 against goldens that diffusers computes
# on this GPU in the same precision; then a CUDA generate. Logs go to $OUT.
source scripts/device/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/ref && tar -xJf .device/reference.tar.xz -C /tmp/ref
REF=/tmp/ref/reference
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a $OUT/device.txt
$DIFFUSE cuda-selftest > $OUT/selftest.log 2>&1; echo "selftest exit $?"; tail -1 $OUT/selftest.log
for p in fp32 tf32; do
  for a in fused math; do
    $DIFFUSE check-reference --reference $REF --device cuda --precision $p --attention $a > $OUT/check-$p-$a.log 2>&1
    echo "check-reference $p $a: exit $? — $(tail -1 $OUT/check-$p-$a.log)"
  done
done
# The tf32 bound against diffusers' own tf32 (allow_tf32 on this GPU, same fixtures, same metric).
python3 scripts/device/tf32_parity.py $REF --device cuda > $OUT/tf32-diffusers.log 2>&1; echo "diffusers tf32: $(tail -1 $OUT/tf32-diffusers.log)"
for p in fp16 bf16; do
  python3 scripts/device/make_gpu_goldens.py $REF /tmp/gpu-$p $p > $OUT/goldens-$p.log 2>&1 || { echo "golden generation $p failed"; tail -5 $OUT/goldens-$p.log; }
  $DIFFUSE check-reference --reference /tmp/gpu-$p --device cuda --precision $p > $OUT/check-$p.log 2>&1
  echo "check-reference $p vs diffusers $p on this GPU: exit $? — $(tail -1 $OUT/check-$p.log)"
done
grep -h FAIL $OUT/check-*.log | head -20
$DIFFUSE generate "a photo of a cat wearing a red hat" --model $REF/models/tiny-sd15 --device cuda --steps 20 --seed 1 --output /tmp/cuda.png 2>&1 | tail -2
