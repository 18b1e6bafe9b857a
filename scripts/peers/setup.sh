#!/usr/bin/env bash
# Sets up the CPU peers outside the repository, under PEERS (default /work/peers); each part is
# skipped when it is already there:
#   diffusers-venv/            diffusers + PyTorch from shared/bench/requirements.txt (PyPI)
#   sd.cpp/                    stable-diffusion.cpp at SDCPP_COMMIT with its ggml submodule, from
#                              local git mirrors (SDCPP_MIRROR, GGML_MIRROR: bare repositories),
#                              built CPU-only, Release, -march=native; sd.cpp/PEER_COMMIT records it
#   sd15-random.safetensors    random SD 1.5 weights in the LDM single-file layout (fp32, 4.3 GB)
#   taesd-random.safetensors   random tiny-autoencoder weights for sd.cpp's --taesd (fp32, 10 MB)
#
# The mirrors may lack their largest blobs (sd.cpp's tokenizer vocabularies for T5, UMT5, Qwen,
# Mistral, Gemma and GPT-OSS). Those headers are then replaced by empty arrays: only text encoders
# of other model families (SD3, Flux, Wan, Qwen-Image, ...) read them, never SD 1.x, whose CLIP
# vocabulary must be present. Every stubbed file is listed in sd.cpp/PEER_STUBS.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
peers=${PEERS:-/work/peers}
sdcpp_commit=${SDCPP_COMMIT:-97d2990807fe6d558e395f8764198d7c7e7b411c}
sdcpp_mirror=${SDCPP_MIRROR:-/work/.mirror/leejet+stable-diffusion.cpp/repo}
ggml_mirror=${GGML_MIRROR:-/work/.mirror/ggml-org+ggml/repo}
requirements=$repo/../shared/bench/requirements.txt
[ -f "$requirements" ] || requirements=/work/shared/bench/requirements.txt
mkdir -p "$peers"

# Writes the blobs of COMMIT in the bare repository R under DEST; prints the paths whose blob
# the mirror does not hold, and the submodules as "SUBMODULE path commit".
extract() {
    local r=$1 commit=$2 dest=$3 mode type obj path
    git -C "$r" ls-tree -r "$commit" | while read -r mode type obj path; do
        if [ "$type" = commit ]; then echo "SUBMODULE $path $obj"; continue; fi
        mkdir -p "$dest/$(dirname "$path")"
        if [ "$mode" = 120000 ]; then
            ln -sfn "$(git -C "$r" cat-file blob "$obj")" "$dest/$path"
        elif git -C "$r" cat-file blob "$obj" > "$dest/$path" 2>/dev/null; then
            [ "$mode" = 100755 ] && chmod +x "$dest/$path"
            :
        else
            rm -f "$dest/$path"; echo "MISSING $path"
        fi
    done
}

# 1. diffusers + PyTorch
if [ ! -x "$peers/diffusers-venv/bin/python" ]; then
    python3 -m venv "$peers/diffusers-venv"
    "$peers/diffusers-venv/bin/pip" install -r "$requirements"
fi

# 2. stable-diffusion.cpp
src=$peers/sd.cpp
if [ ! -x "$src/build/bin/sd-cli" ]; then
    if [ ! -f "$src/CMakeLists.txt" ]; then
        git -C "$sdcpp_mirror" cat-file -e "$sdcpp_commit^{commit}" \
            || { echo "setup.sh: $sdcpp_mirror has no commit $sdcpp_commit" >&2; exit 1; }
        report=$(extract "$sdcpp_mirror" "$sdcpp_commit" "$src")
        ggml_commit=$(awk '$1 == "SUBMODULE" && $2 == "ggml" { print $3 }' <<< "$report")
        git -C "$ggml_mirror" cat-file -e "$ggml_commit^{commit}" \
            || { echo "setup.sh: $ggml_mirror has no commit $ggml_commit (sd.cpp's ggml submodule)" >&2; exit 1; }
        rm -rf "$src/ggml"
        report+=$'\n'$(extract "$ggml_mirror" "$ggml_commit" "$src/ggml" | sed 's|^MISSING |MISSING ggml/|')
        # vocab.cpp reads each array by name (sizeof); a one-byte array keeps it compiling.
        declare -A arrays=(
            [gemma_merges]=gemma_merges_utf8_c_str [gemma_vocab]=gemma_vocab_json_utf8_c_str
            [gemma2_merges]=gemma2_merges_utf8_c_str [gemma2_vocab]=gemma2_vocab_json_utf8_c_str
            [gpt_oss_merges]=gpt_oss_merges_utf8_c_str [gpt_oss_vocab]=gpt_oss_vocab_json_utf8_c_str
            [mistral_merges]=mistral_merges_utf8_c_str [mistral_vocab]=mistral_vocab_json_utf8_c_str
            [qwen_merges]=qwen2_merges_utf8_c_str [t5]=t5_tokenizer_json_str [umt5]=umt5_tokenizer_json_str)
        : > "$src/PEER_STUBS"
        while read -r kind path _; do
            [ "$kind" = MISSING ] || continue
            case $path in
                assets/*) ;;  # images and videos of the documentation
                src/tokenizers/vocab/*.hpp)
                    name=${arrays[$(basename "$path" .hpp)]:-}
                    [ -n "$name" ] || { echo "setup.sh: the mirror lacks $path (no stub known for it)" >&2; exit 1; }
                    printf '// PEER BUILD STUB: the mirror lacked this blob; only non-SD text encoders read it.\nstatic const unsigned char %s[] = {0x00};\n' \
                        "$name" > "$src/$path"
                    echo "$path" >> "$src/PEER_STUBS" ;;
                *) echo "setup.sh: the mirror lacks $path" >&2; exit 1 ;;
            esac
        done <<< "$report"
        echo "$(git -C "$sdcpp_mirror" rev-parse --short=8 "$sdcpp_commit") (ggml ${ggml_commit:0:8})" > "$src/PEER_COMMIT"
    fi
    command -v cmake > /dev/null || apt-get install -y cmake
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DSD_WEBP=OFF -DSD_WEBM=OFF
    nice -n 19 cmake --build "$src/build" --target sd-cli -j "$(nproc)"
fi

# 3. the checkpoints
if [ ! -f "$peers/sd15-random.safetensors" ] || [ ! -f "$peers/taesd-random.safetensors" ]; then
    nice -n 10 "$peers/diffusers-venv/bin/python" "$here/make_sd15_ldm_checkpoint.py" \
        --out "$peers/sd15-random.safetensors" --taesd-out "$peers/taesd-random.safetensors"
fi
echo "peers ready under $peers: sd.cpp $(cat "$src/PEER_COMMIT")" >&2
