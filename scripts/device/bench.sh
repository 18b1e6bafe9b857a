#!/usr/bin/env bash
# Issue 8's table on the GPU machine: our pipeline and the diffusers peer on the same GPU in the
# same run (same architectures with random weights, same steps, sizes and prompt). Everything
# lands in two files: $OUT/rows.jsonl (one JSON row per line) and $OUT/log.txt.
source scripts/device/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/ref /tmp/shared && tar -xJf .device/reference.tar.xz -C /tmp/ref && tar -xJf .device/peer.tar.xz -C /tmp/shared
ln -sfn /tmp/ref/reference /tmp/shared/reference
LOG=$OUT/log.txt; ROWS=$OUT/rows.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a $LOG
peer() { echo "== peer $*" | tee -a $LOG; python3 /tmp/shared/bench/bench_diffusers_gpu.py "$@" 2>>$LOG > /tmp/p.json; python3 -c "
import json; [print(json.dumps(r)) for r in json.load(open('/tmp/p.json'))['rows']]" >> $ROWS; }
for job in ${JOBS:-sd15 sdxl}; do
  case $job in
    sd15) ours --architecture sd15 --component pipeline --size 512x512 --steps 50 --setups ${SD15_OURS:-fp16,fp16-graphs,fp16-compiled,fp16-compiled-nhwc,fp16-compiled-nhwc+autotune,bf16-compiled,bf16-compiled-nhwc+autotune} --reps 3
          peer --architecture sd15 --size 512x512 --steps 50 --setups ${SD15_PEER:-fp32,tf32,half} --reps 3 ;;
    sd15-unet) ours --architecture sd15 --component unet --size 512x512 --setups fp16,fp16-compiled --reps 10 ;;
    sdxl) ours --architecture sdxl-base --component pipeline --size 1024x1024 --steps 30 --setups ${SDXL_OURS:-bf16,bf16-compiled+basic-attention,bf16-compiled,bf16-compiled-nhwc,bf16-compiled-nhwc+autotune} --reps 3
          peer --architecture sdxl-base --size 1024x1024 --steps 30 --dtype bf16 --setups ${SDXL_PEER:-half} --reps 3 ;;
    sd15-compile) peer --architecture sd15 --size 512x512 --steps 50 --setups compile --reps 3 ;;
    sdxl-compile) peer --architecture sdxl-base --size 1024x1024 --steps 30 --dtype bf16 --setups compile --reps 2 ;;
    # The seeds' BK-SDM row: PNDM, 4 images, the tiny autoencoder (the peer script runs DDIM and the full VAE).
    bksdm) ours --architecture bksdm-small --component pipeline --size 512x512 --steps 25 --batch 4 --scheduler pndm \
             --setups fp16-compiled,fp16-compiled+tiny-vae,fp16-compiled-nhwc+tiny-vae --reps 3 ;;
  esac
done
python3 scripts/device/rows_table.py
