#!/usr/bin/env bash
# The CPU table of BENCHMARKS.md: Diffuse and both peers, back to back on one quiet machine.
# Rows (JSON, one per line) go to $OUT/rows.jsonl, logs to $OUT/log.txt. Needs the peers set up
# with scripts/peers/setup.sh. Takes about an hour on the 2-core development machine.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/cpu-session}; mkdir -p $OUT
D=.build/release/diffuse; P=scripts/peers
ROWS=$OUT/rows.jsonl; LOG=$OUT/log.txt
rows() { python3 -c "
import json, sys
t = sys.stdin.read(); t = t[t.index('{'):]
for r in json.loads(t)['rows']: print(json.dumps(dict(r, system=r.get('system', '$1'))))" >> $ROWS; }
ours() { echo "== diffuse $*" >> $LOG; $D bench --device cpu --json "$@" 2>>$LOG | rows diffuse; }
peer() { echo "== $*" >> $LOG; "$@" 2>>$LOG | rows peer; }
date -u >> $LOG; grep -m1 "model name" /proc/cpuinfo >> $LOG
ours --architecture sd15 --component unet --size 512x512 --setups baseline,fused-attention,compiled,fused-qkv,int8,fp16-weights --reps 3
peer $P/diffusers-cpu.sh --architecture sd15 --component unet --size 512x512 --reps 3
ours --architecture sd15 --component unet --size 256x256 --setups baseline,fused-attention,compiled,fused-qkv,int8,fp16-weights --reps 3
peer $P/diffusers-cpu.sh --architecture sd15 --component unet --size 256x256 --reps 3
for s in 512x512 256x256; do
  ours --architecture sd15 --component vae --size $s --setups baseline,compiled,tiny-vae --reps 3
  peer $P/diffusers-cpu.sh --architecture sd15 --component vae --size $s --reps 3 --modes fp32
  ours --architecture sd15 --component taesd --size $s --setups compiled --reps 5
  peer $P/diffusers-cpu.sh --architecture sd15 --component taesd --size $s --reps 5 --modes fp32
done
ours --architecture sd15 --component pipeline --size 256x256 --steps 20 --setups compiled,low-memory,sequential-offload,fp16-weights-low-memory,int8 --reps 2
peer $P/diffusers-cpu.sh --architecture sd15 --component pipeline --size 256x256 --steps 20 --modes fp32 --reps 1
peer $P/sdcpp.sh --size 256x256 --steps 3 --types f32,f16,q8_0 --fa on
peer $P/sdcpp.sh --size 512x512 --steps 3 --types f16 --fa on
peer $P/sdcpp.sh --size 256x256 --steps 20 --types f16 --fa on
ours --architecture sd15 --component vae --size 1024x1024 --setups compiled,tiled-vae --reps 1
ours --architecture sd15 --component vae --size 2048x2048 --setups tiled-vae --reps 1
date -u >> $LOG
