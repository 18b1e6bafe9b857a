#!/usr/bin/env bash
# README command 1: on a fresh Debian/Ubuntu machine, install what is missing, build Diffuse,
# and run the main job — an image from the built-in demonstration model and the benchmark
# table of the real Stable Diffusion 1.5 UNet (random weights; no download, no network needed
# once the packages are installed).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

if ! dpkg -s libdnnl-dev zlib1g-dev >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libdnnl-dev zlib1g-dev
fi

# A Swift 6 toolchain, through swift.org's installer, if none is on the PATH.
if ! command -v swift >/dev/null 2>&1; then
    $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl gnupg2 ca-certificates
    arch=$(uname -m)
    curl -fsSL -o /tmp/swiftly.tar.gz "https://download.swift.org/swiftly/linux/swiftly-${arch}.tar.gz"
    tar -xzf /tmp/swiftly.tar.gz -C /tmp
    /tmp/swiftly init --assume-yes --quiet-shell-followup
    . "${SWIFTLY_HOME_DIR:-$HOME/.local/share/swiftly}/env.sh"
fi

swift build -c release --product diffuse
bin=.build/release/diffuse

echo "== An image from the built-in demonstration model (random weights: it shows the pipeline runs, not the prompt)"
$bin generate "a lighthouse on a cliff at dawn" --seed 7 --output demo.png --overwrite
echo "== Benchmark: the real Stable Diffusion 1.5 UNet (random weights), one step at 256x256 with guidance"
$bin bench --architecture sd15 --component unet --size 256x256 --reps 3
