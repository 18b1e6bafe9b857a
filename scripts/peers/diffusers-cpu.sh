#!/usr/bin/env bash
# The diffusers + PyTorch peer on the CPU: runs shared/bench/bench_diffusers_cpu.py in its venv
# with 2 threads (this machine's cores) unless --threads is given. Takes the script's arguments
# and prints what it prints: one JSON object {"rows": [...]} on stdout in the schema of
# `diffuse bench --json`, each row also on stderr as it is done.
#
#   scripts/peers/diffusers-cpu.sh --component unet --architecture sd15 --size 512x512 --reps 3
#   scripts/peers/diffusers-cpu.sh --component pipeline --architecture sd15 --size 256x256 --steps 20 --modes fp32 --reps 1
#
# peak_rss_mb is the process's peak (ru_maxrss): with several --modes, a later row's peak includes
# the earlier modes' models; measure memory with one mode per run.
#
# Environment: PEERS (default /work/peers) holds diffusers-venv; BENCH_SCRIPT overrides the script.
# Set up once with: python3 -m venv $PEERS/diffusers-venv &&
#   $PEERS/diffusers-venv/bin/pip install -r shared/bench/requirements.txt
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
peers=${PEERS:-/work/peers}
python=$peers/diffusers-venv/bin/python
script=${BENCH_SCRIPT:-$(cd "$here/../.." && pwd)/../shared/bench/bench_diffusers_cpu.py}
[ -f "$script" ] || script=/work/shared/bench/bench_diffusers_cpu.py

if [ ! -x "$python" ]; then
    echo "diffusers-cpu.sh: no venv at $peers/diffusers-venv (see the set-up line in this script)" >&2
    exit 2
fi
if [ ! -f "$script" ]; then
    echo "diffusers-cpu.sh: bench script not found at $script (set BENCH_SCRIPT)" >&2
    exit 2
fi

threads=2
for arg in "$@"; do
    case $arg in --threads|--threads=*) threads= ;; esac
done

# PyTorch's intra-op pool follows --threads; the OpenMP/MKL variables keep any other pool to the same count.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
# The CUDA-enabled wheel must not look for a GPU.
export CUDA_VISIBLE_DEVICES=""
exec "$python" "$script" "$@" ${threads:+--threads "$threads"}
