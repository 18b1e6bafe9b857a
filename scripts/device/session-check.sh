#!/usr/bin/env bash
# Part 1 of a GPU session (issues 7 and 8). Starts the diffusers + torch.compile(max-autotune)
# peer detached (setsid), because its compilation takes longer than one device command; part 2
# (session-bench.sh) waits for it before timing anything. Then the correctness checks, whose
# timings do not matter: torch.Generator("cuda") bit-exactness, every kernel, --generator cuda
# end to end against diffusers, sequential offload against the resident run; op timings (the
# pipelined attention kernel against the basic one). Logs go to $OUT.
source scripts/device/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/ref /tmp/shared
[ -d /tmp/ref/reference ] || tar -xJf .device/reference.tar.xz -C /tmp/ref
[ -d /tmp/shared/bench ] || tar -xJf .device/peer.tar.xz -C /tmp/shared
ln -sfn /tmp/ref/reference /tmp/shared/reference
REF=/tmp/ref/reference
if [ ! -e /tmp/peer-compile.started ]; then
  touch /tmp/peer-compile.started
  setsid bash -c "PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR timeout 1700 python3 /tmp/shared/bench/bench_diffusers_gpu.py \
      --architecture sd15 --size 512x512 --steps 50 --setups compile --reps 3 > /tmp/peer-compile.json 2> /tmp/peer-compile.log; \
      echo \$? > /tmp/peer-compile.done" < /dev/null > /dev/null 2>&1 &
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a $OUT/device.txt

echo "== torch.Generator('cuda')"
python3 scripts/device/make_cuda_rng_goldens.py /tmp/rng.safetensors
$DIFFUSE cuda-selftest --torch-randn /tmp/rng.safetensors > $OUT/rng.log 2>&1; echo "rng exit $?"; grep -c "^ok" $OUT/rng.log; grep FAIL $OUT/rng.log | head -5; tail -2 $OUT/rng.log

echo "== tf32: ours and diffusers' own allow_tf32 against the fp32 goldens (same metric)"
$DIFFUSE check-reference --reference $REF --device cuda --precision tf32 > $OUT/check-tf32.log 2>&1; tail -1 $OUT/check-tf32.log
python3 scripts/device/tf32_parity.py $REF --device cuda > $OUT/tf32-diffusers.log 2>&1; tail -1 $OUT/tf32-diffusers.log

echo "== kernels"
$DIFFUSE cuda-selftest > $OUT/selftest.log 2>&1; echo "selftest exit $?"; grep -E "FAIL|skip" $OUT/selftest.log | head -20; tail -1 $OUT/selftest.log

echo "== op timings: pipelined vs basic attention kernel, cuDNN vs im2col, int8/fp8 linears"
$DIFFUSE cuda-selftest --benchmark-only > $OUT/op-bench.log 2>&1; echo "op benchmark exit $?"; grep -E "attention|conv" $OUT/op-bench.log

echo "== channels-last (NHWC) and autotuned algorithms: tiny models end to end against the goldens"
for p in fp32 fp16; do
  $DIFFUSE check-reference --reference $REF --device cuda --precision $p --channels-last --autotune > $OUT/check-nhwc-$p.log 2>&1
  echo "check-reference --channels-last --autotune $p: exit $? — $(tail -1 $OUT/check-nhwc-$p.log)"
done

echo "== --generator cuda end to end (tiny-sd15, fp32)"
P="a photo of a cat wearing a red hat"
$DIFFUSE generate "$P" --model $REF/models/tiny-sd15 --device cuda --precision fp32 --generator cuda --steps 20 --seed 7 \
    --output /tmp/ours-cudagen.png --overwrite 2>&1 | tail -1
python3 scripts/device/compare_cuda_generator.py $REF/models/tiny-sd15 /tmp/ours-cudagen.png 7 20 "$P" 2>&1 | grep -v Warn | tail -3

echo "== sequential offload gives the resident image"
for o in none sequential; do
  $DIFFUSE generate "$P" --model $REF/models/tiny-sd15 --device cuda --precision fp16 --seed 3 --steps 10 --offload $o \
      --output /tmp/offload-$o.png --overwrite 2>&1 | tail -1
done
cmp /tmp/offload-none.png /tmp/offload-sequential.png && echo "offload: identical PNGs"
$DIFFUSE generate "$P" --device cuda --architecture sd15 --offload sequential --steps 5 --output /tmp/sd15-seq.png --overwrite 2>&1 | tail -1
echo "== peer: $(tail -c 300 /tmp/peer-compile.log | tr '\n' ' ')"
save_peer_cache
