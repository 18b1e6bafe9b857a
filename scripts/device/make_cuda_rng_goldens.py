"""torch.Generator("cuda") goldens for `diffuse cuda-selftest --torch-randn FILE`.

Writes FILE (safetensors) with tensors named s<seed>/<call>/<shape>: the call-th
torch.randn(shape, generator=g, device="cuda") of g = torch.Generator("cuda").manual_seed(seed),
so the engine replays every seed's calls in order (the generator's offset carries over).
Shapes cover one partial curand_normal4 stretch, SD latents (1x4x64x64, 2x4x96x96, SDXL's
1x4x128x128), a size that needs several grid-stride passes and odd sizes.

  python3 make_cuda_rng_goldens.py FILE
"""
import sys
import torch
from safetensors.torch import save_file

shapes = [(3,), (1, 4, 64, 64), (2, 4, 96, 96), (1, 4, 128, 128), (1_234_567,), (7, 13, 5)]
out = {}
for seed in (0, 1, 42, 2024, 123456789, 2**40 + 17):
    g = torch.Generator("cuda").manual_seed(seed)
    for call, shape in enumerate(shapes):
        t = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
        out[f"s{seed}/{call}/{'x'.join(map(str, shape))}"] = t.cpu().contiguous()
save_file(out, sys.argv[1])
print(f"{len(out)} draws from {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), torch {torch.__version__}")
