#!/usr/bin/env bash
# Where a UNet step's GPU time goes, by op and implementation (DIFFUSE_PROFILE=1: an event after
# every step, no graph capture, so the totals include launch gaps). SD 1.5 in fp16 at 512x512 and
# SDXL in bf16 at 1024x1024, NCHW and channels-last, all with guidance (batch 2). Profiles go to $OUT/profile-*.txt.
source scripts/device/env.sh
for job in "sd15 512x512 fp16-compiled" "sd15 512x512 fp16-compiled-nhwc" "sdxl 1024x1024 bf16-compiled" "sdxl 1024x1024 bf16-compiled-nhwc"; do
  set -- $job
  DIFFUSE_PROFILE=1 $DIFFUSE bench --device cuda --architecture $1 --component unet --size $2 --setups $3 --reps 5 \
      > /dev/null 2> $OUT/profile-$1-$3.txt
  echo "== $1 $2 $3"; grep -A 25 "^profile" $OUT/profile-$1-$3.txt
done
