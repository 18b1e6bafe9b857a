#!/usr/bin/env bash
# The memory rows of BENCHMARKS.md (CPU sequential offload) and the int8 rows after epilogue
# fusion, with the diffusers pipeline peer in the same run. Rows (JSON, one per line) go to
# $OUT/rows.jsonl, logs to $OUT/log.txt. About 40 minutes on the 2-core development machine.
# The last two commands need root (a memory cgroup; see memory-limit.sh).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/cpu-offload-session}; mkdir -p $OUT
D=.build/release/diffuse; P=scripts/peers
ROWS=$OUT/rows.jsonl; LOG=$OUT/log.txt
rows() { python3 -c "
import json, sys
t = sys.stdin.read()
if '{' not in t: sys.exit(0)
t = t[t.index('{'):]
for r in json.loads(t)['rows']: print(json.dumps(dict(r, system=r.get('system', '$1'), note=r.get('note') or '$2')))" >> $ROWS; }
ours() { echo "== diffuse $*" >> $LOG; $D bench --device cpu --json "$@" 2>>$LOG | rows diffuse ""; }
peer() { echo "== $*" >> $LOG; "$@" 2>>$LOG | rows peer ""; }
limited() { echo "== (1536 MB cgroup) diffuse $*" >> $LOG
    scripts/bench/memory-limit.sh 1536 $D bench --device cpu --json "$@" 2>>$LOG | rows diffuse "in a 1536 MB memory cgroup"
    echo "exit status ${PIPESTATUS[0]}" >> $LOG; }
date -u >> $LOG; grep -m1 "model name" /proc/cpuinfo >> $LOG
ours --architecture sd15 --component unet --size 512x512 --setups compiled,int8,sequential-offload --reps 3
ours --architecture sd15 --component unet --size 256x256 --setups compiled,int8,sequential-offload --reps 3
ours --architecture sd15 --component pipeline --size 256x256 --steps 20 --setups compiled,sequential-offload,int8,int8+sequential-offload --reps 3
peer $P/diffusers-cpu.sh --architecture sd15 --component pipeline --size 256x256 --steps 20 --modes fp32 --reps 3
limited --architecture sd15 --component pipeline --size 256x256 --steps 20 --setups sequential-offload --reps 1
limited --architecture sd15 --component pipeline --size 256x256 --steps 20 --setups compiled --reps 1
date -u >> $LOG
