"""End-to-end check of --generator cuda: diffusers makes the same image on this GPU with
generator=torch.Generator("cuda").manual_seed(SEED) (fp32, TF32 off), and it is compared with
our PNG; the same with a CPU generator shows how different the other noise would be.

  python3 compare_cuda_generator.py MODEL_DIR OURS.png SEED STEPS PROMPT
"""
import sys
import numpy as np
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline

model, ours, seed, steps, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False).to("cuda")
pipe.set_progress_bar_config(disable=True)
mine = np.asarray(Image.open(ours).convert("RGB")).astype(np.int16)
for device in ("cuda", "cpu"):
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5,
                 generator=torch.Generator(device).manual_seed(seed)).images[0]
    ref = np.asarray(image.convert("RGB")).astype(np.int16)
    d = np.abs(ref - mine)
    print(f"ours (--generator cuda) vs diffusers generator={device}: size {ref.shape[1]}x{ref.shape[0]}, "
          f"mean |diff| {d.mean():.3f} levels, max {d.max()}")
