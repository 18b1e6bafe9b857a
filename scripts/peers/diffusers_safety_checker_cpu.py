#!/usr/bin/env python3
"""The safety-checker peer: diffusers' StableDiffusionSafetyChecker with SD 1.x's architecture
(CompVis/stable-diffusion-safety-checker: openai's CLIP ViT-L/14 vision tower, 224 px, projection
768; random weights) checking one 512x512 picture as the pipeline's run_safety_checker does (the
CLIPImageProcessor, then the checker), fp32 on the CPU, 2 threads, no grad. Prints one row in the
schema of `diffuse bench --json` (its keys that apply):

    PEERS/diffusers-venv/bin/python scripts/peers/diffusers_safety_checker_cpu.py --reps 5

to compare with `diffuse bench --component safety-checker --setups compiled --reps 5`.
"""
import argparse
import json
import resource
import time

import diffusers
import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=768)).eval()
processor = CLIPImageProcessor(size=224, crop_size=224)
picture = Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
decoded = np.asarray(picture)[None].astype(np.float32) / 127.5 - 1


def check():
    pixels = processor([picture], return_tensors="pt").pixel_values
    with torch.no_grad():
        return checker(clip_input=pixels, images=decoded.copy())


times = []
t0 = time.perf_counter()
check()
first = time.perf_counter() - t0
for _ in range(args.reps):
    t0 = time.perf_counter()
    check()
    times.append(time.perf_counter() - t0)
times.sort()
row = {"system": f"diffusers {diffusers.__version__} / torch {torch.__version__}", "setup": "fp32",
       "component": "safety-checker", "architecture": "sd15", "size": "512x512", "batch": 1,
       "median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1], "first_run_s": round(first, 2),
       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
print(json.dumps(row))
