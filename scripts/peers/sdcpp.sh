#!/usr/bin/env bash
# The stable-diffusion.cpp peer on the CPU: runs sd-cli with 2 threads on the random-weight SD 1.5
# checkpoint for a size, a number of steps, weight types and with/without flash attention, and
# prints one JSON object {"system": "stable-diffusion.cpp", "rows": [...]} on stdout in the schema
# of `diffuse bench --json` (each row also on stderr as it is done). Per configuration: a unet row
# (one sampling step = cond + uncond, comparable to a batch-2 forward), vae, text-encoder and
# pipeline rows (peak RSS from /usr/bin/time -v). See sdcpp_bench.py for what is measured exactly.
#
#   scripts/peers/sdcpp.sh --size 512x512 --steps 3 --types f32,f16,q8_0 --fa both
#   scripts/peers/sdcpp.sh --size 256x256 --steps 20 --types f32 --fa off
#   scripts/peers/sdcpp.sh --size 512x512 --steps 2 --taesd /work/peers/taesd-random.safetensors
#
# Options (sdcpp_bench.py --help): --size WxH, --steps N, --types f32,f16,q8_0, --fa off|on|both,
# --reps N, --threads N (default 2), --taesd FILE (decode with the tiny autoencoder), --lazy-load,
# --sampling-method, --cfg-scale, --seed, --logs DIR.
# Environment: PEERS (default /work/peers) holds sd.cpp/build/bin/sd-cli and sd15-random.safetensors
# (made by setup.sh); SDCPP_BIN and SDCPP_MODEL override them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
peers=${PEERS:-/work/peers}
sd=${SDCPP_BIN:-$peers/sd.cpp/build/bin/sd-cli}
model=${SDCPP_MODEL:-$peers/sd15-random.safetensors}
commit=unknown
[ -f "$peers/sd.cpp/PEER_COMMIT" ] && commit=$(cat "$peers/sd.cpp/PEER_COMMIT")

[ -x "$sd" ] || { echo "sdcpp.sh: no sd-cli at $sd (build it with scripts/peers/setup.sh)" >&2; exit 2; }
[ -f "$model" ] || { echo "sdcpp.sh: no checkpoint at $model (make it with scripts/peers/setup.sh)" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "sdcpp.sh: /usr/bin/time is needed for peak RSS (apt-get install -y time)" >&2; exit 2; }

exec python3 "$here/sdcpp_bench.py" --sd "$sd" --model "$model" --commit "$commit" "$@"
