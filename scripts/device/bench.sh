#!/usr/bin/env bash
# Issue 8's table on the GPU machine: our pipeline and the diffusers peer (same GPU, same run,
# same architectures with random weights, same steps and sizes), then the parity re-check.
source scripts/device/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/ref /tmp/shared && tar -xJf .device/reference.tar.xz -C /tmp/ref && tar -xJf .device/peer.tar.xz -C /tmp/shared
ln -sfn /tmp/ref/reference /tmp/shared/reference
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
step() { echo "== $1"; shift; "$@"; }
B="$DIFFUSE bench --device cuda --json"
step "ours sd15 pipeline" $B --architecture sd15 --component pipeline --size 512x512 --steps 50 --setups ${SD15_SETUPS:-fp32,tf32,fp16,bf16} --reps 2 > $OUT/ours-sd15.json 2> $OUT/ours-sd15.log
step "ours sd15 unet" $B --architecture sd15 --component unet --size 512x512 --setups fp16,fp16-fused-qkv,bf16 --reps 5 > $OUT/ours-sd15-unet.json 2>> $OUT/ours-sd15.log
step "ours sdxl pipeline" $B --architecture sdxl-base --component pipeline --size 1024x1024 --steps 30 --setups bf16,fp16 --reps 2 > $OUT/ours-sdxl.json 2> $OUT/ours-sdxl.log
step "peer sd15" python3 /tmp/shared/bench/bench_diffusers_gpu.py --architecture sd15 --size 512x512 --steps 50 --setups ${PEER_SETUPS:-fp32,tf32,half} --reps 2 > $OUT/peer-sd15.json 2> $OUT/peer-sd15.log
step "peer sdxl" python3 /tmp/shared/bench/bench_diffusers_gpu.py --architecture sdxl-base --size 1024x1024 --steps 30 --dtype bf16 --setups half --reps 2 > $OUT/peer-sdxl.json 2> $OUT/peer-sdxl.log
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
def rows(f):
    try: return json.load(open(os.path.join(out, f)))["rows"]
    except Exception as e: return [{"setup": f"{f}: {e}"}]
for f in ["ours-sd15.json", "ours-sd15-unet.json", "ours-sdxl.json", "peer-sd15.json", "peer-sdxl.json"]:
    for r in rows(f):
        print(f"{f:22} {r.get('setup',''):22} {r.get('component',''):9} median {r.get('median_s','-')} s  it/s {r.get('it_per_s','')}  gpu {r.get('peak_gpu_mb','')} MB  err {r.get('max_rel_err','')} {r.get('note','')[:60]}")
PY
for p in tf32 bf16; do
  if [ $p = bf16 ]; then python3 scripts/device/make_gpu_goldens.py /tmp/ref/reference /tmp/gpu-bf16 bf16 > $OUT/goldens-bf16.log 2>&1; R=/tmp/gpu-bf16; else R=/tmp/ref/reference; fi
  $DIFFUSE check-reference --reference $R --device cuda --precision $p > $OUT/check-$p.log 2>&1; echo "check-reference $p: $(tail -1 $OUT/check-$p.log)"
done
