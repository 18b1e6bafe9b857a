#!/usr/bin/env python3
"""The depth-estimator peer: transformers' DPTForDepthEstimation with DPT-Hybrid's architecture
(Intel/dpt-hybrid-midas, stable-diffusion-2-depth's depth_estimator: transformers' conversion
script's settings; random weights) on one 384x384 input, fp32 on the CPU, 2 threads, torch
inference mode. Prints one row in the schema of `diffuse bench --json` (its keys that apply):

    PEERS/diffusers-venv/bin/python scripts/peers/transformers_dpt_cpu.py --reps 5

to compare with `diffuse bench --component depth-estimator --setups compiled --reps 5`.
"""
import argparse
import json
import resource
import time

import torch
import transformers
from transformers import DPTConfig, DPTForDepthEstimation

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
config = DPTConfig(is_hybrid=True, reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768])
model = DPTForDepthEstimation(config).eval()
x = torch.randn(1, 3, 384, 384)
times = []
with torch.inference_mode():
    t0 = time.perf_counter()
    model(x)
    first = time.perf_counter() - t0
    for _ in range(args.reps):
        t0 = time.perf_counter()
        model(x).predicted_depth
        times.append(time.perf_counter() - t0)
times.sort()
row = {"system": f"transformers {transformers.__version__} / torch {torch.__version__}", "setup": "fp32",
       "component": "depth-estimator", "architecture": "dpt-hybrid-midas", "size": "384x384", "batch": 1,
       "median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1], "first_run_s": round(first, 2),
       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
       "parameters": sum(p.numel() for p in model.parameters())}
print(json.dumps({"rows": [row]}))
