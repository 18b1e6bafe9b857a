#!/usr/bin/env bash
# Part 2 of a GPU session: waits for the torch.compile peer that session-check.sh started (so
# nothing else runs on the GPU while either system is timed), then our rows for issue 8 in the
# same run: SD 1.5 fp16/bf16 compiled, NCHW, channels-last and autotuned (against the peer),
# model and sequential offload, int8 and fp8 against bf16, attention slicing, tiled VAE at 1920x1080. Rows: $OUT/rows.jsonl.
source scripts/device/env.sh
export PYTHONPATH=/tmp/site
ROWS=$OUT/rows.jsonl; LOG=$OUT/log.txt
for i in $(seq 1 ${PEER_WAIT:-240}); do [ -e /tmp/peer-compile.done ] && break; sleep 1; done
echo "peer compile: $( [ -e /tmp/peer-compile.done ] && echo "exit $(cat /tmp/peer-compile.done)" || echo 'still running')"
cp /tmp/peer-compile.log $OUT/peer-compile.log 2>/dev/null
python3 -c "
import json,sys
try: [print(json.dumps(r)) for r in json.load(open('/tmp/peer-compile.json'))['rows']]
except Exception as e: print('peer: no rows', e, file=sys.stderr)" >> $ROWS
for job in ${JOBS:-sd15 quant offload vae slicing}; do
  case $job in
    sd15) ours --architecture sd15 --component pipeline --size 512x512 --steps 50 --setups fp16,fp16-compiled+basic-attention,fp16-compiled,fp16-compiled-nhwc,fp16-compiled-nhwc+autotune,bf16-compiled --reps 3 ;;
    quant) ours --architecture sd15 --component unet --size 512x512 --setups bf16,bf16-int8,bf16-fp8,bf16-compiled --reps 10
           ours --architecture sdxl-base --component unet --size 1024x1024 --setups bf16,bf16-int8,bf16-fp8,bf16-compiled,bf16-compiled-nhwc,bf16-compiled-nhwc+autotune --reps 5 ;;
    offload) ours --architecture sd15 --component pipeline --size 512x512 --steps 50 --setups fp16,fp16+model-offload,fp16+sequential-offload --reps 2 ;;
    vae) ours --architecture sd15 --component vae --size 1920x1080 --setups fp16,fp16+tiled-vae --reps 2 ;;
    slicing) ours --architecture sd15 --component pipeline --size 512x512 --steps 50 --setups fp16,fp16+sliced-attention --reps 2 ;;
  esac
done
python3 scripts/device/rows_table.py
save_peer_cache
