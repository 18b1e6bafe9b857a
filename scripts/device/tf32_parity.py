"""How close can TF32 arithmetic get to the float32 goldens? diffusers itself, measured with the
bound that `diffuse check-reference` applies (max |error| / max(1, max |golden|), 1e-3 in tf32).

Two ways to run it:

  python3 tf32_parity.py REFERENCE_DIR --device cuda
      diffusers on the GPU with torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 on
      (the seeds' switch), text encoders skipped (the goldens' prompt embeddings are fed, as our
      engine keeps CLIP in fp32 under tf32).

  python3 tf32_parity.py REFERENCE_DIR --device cpu --rounding rn [--ops linear,conv] [--keep-fp32 REGEX,...]
      an emulation on the CPU: the operands of every linear and convolution of the UNet and VAE are
      rounded to TF32 (10 mantissa bits; rn = to nearest even, rna = half away from zero as
      cvt.rna.tf32.f32, rz = truncation) before a float32 product. --keep-fp32 leaves modules whose
      name matches one of the patterns in float32, to see where the error comes from.

Every variant, UNet case and e2e file of the fixture folder is used; nothing is named here.
"""
import argparse, re, sys
from pathlib import Path
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

ap = argparse.ArgumentParser()
ap.add_argument("reference")
ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
ap.add_argument("--rounding", default="rn", choices=["rn", "rna", "rz", "none"])
ap.add_argument("--ops", default="linear,conv")
ap.add_argument("--keep-fp32", default="")
ap.add_argument("--tolerance", type=float, default=1e-3)
args = ap.parse_args()
ref = Path(args.reference)
ops = set(args.ops.split(","))
keep = [re.compile(p) for p in args.keep_fp32.split(",") if p]
SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}


def to_tf32(x):
    """Round a float32 tensor's mantissa to TF32's 10 bits (exponent range is float32's)."""
    if args.rounding == "none" or x.dtype != torch.float32:
        return x
    b = x.contiguous().view(torch.int32)
    if args.rounding == "rn":
        b = (b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF
    elif args.rounding == "rna":
        b = (b + 0x1000) & ~0x1FFF
    else:
        b = b & ~0x1FFF
    return b.view(torch.float32)


# Emulation: linears and convolutions of modules marked `_tf32` round their operands.
current = []
_linear, _conv2d = F.linear, F.conv2d


def emulated(kind):
    return args.device == "cpu" and kind in ops and current and current[-1] is not None


def linear(x, w, b=None):
    return _linear(to_tf32(x), to_tf32(w), b) if emulated("linear") else _linear(x, w, b)


def conv2d(x, w, b=None, *rest, **kw):
    return _conv2d(to_tf32(x), to_tf32(w), b, *rest, **kw) if emulated("conv") else _conv2d(x, w, b, *rest, **kw)


def mark(model, prefix):
    """Wrap every Linear/Conv2d so the functional patches know which module (and whether it is in TF32) runs."""
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            full = prefix + name
            tf32 = not any(p.search(full) for p in keep)
            inner = mod.forward

            def forward(*a, _inner=inner, _tf32=tf32, **k):
                current.append(True if _tf32 else None)
                try:
                    return _inner(*a, **k)
                finally:
                    current.pop()
            mod.forward = forward


if args.device == "cpu":
    F.linear, F.conv2d = linear, conv2d
    torch.nn.modules.linear.F.linear = linear
    torch.nn.modules.conv.F.conv2d = conv2d
    torch.set_num_threads(max(1, torch.get_num_threads()))
else:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def rel(out, golden):
    out = out.detach().float().cpu()
    return ((out - golden).abs().max() / max(1.0, golden.abs().max().item())).item()


# The e2e arguments the reference README states ("... 4 steps, guidance 7.5"), as check-reference reads them.
readme = next((l for l in (ref / "README.md").read_text().splitlines() if "e2e_" in l and "guidance" in l), "")
steps_match = re.search(r"(\d+) steps", readme)
guidance_match = re.search(r"guidance (\d+(?:\.\d+)?)", readme)
E2E_STEPS = int(steps_match.group(1)) if steps_match else 4
E2E_GUIDANCE = float(guidance_match.group(1)) if guidance_match else 7.5

results = []
for model_dir in sorted(p for p in (ref / "models").iterdir() if (p / "unet").is_dir()):
    name, gold = model_dir.name, ref / "golden" / model_dir.name
    if not (gold / "unet.safetensors").exists():
        continue
    xl = (model_dir / "text_encoder_2").is_dir()
    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(
        str(model_dir), torch_dtype=torch.float32).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    mark(pipe.unet, "unet.")
    mark(pipe.vae, "vae.")
    dev = lambda t: t.to(args.device)
    g = load_file(gold / "unet.safetensors")
    extra = {}
    if "text_embeds" in g:
        extra["added_cond_kwargs"] = {"text_embeds": dev(g["text_embeds"]), "time_ids": dev(g["time_ids"])}
    with torch.no_grad():
        for key in sorted(k for k in g if k.startswith("noise_pred_")):
            case = key[len("noise_pred_"):]
            t = g[f"timestep_{case}"]
            t = t[0] if t.numel() == 1 else t
            out = pipe.unet(dev(g["sample"]), dev(t), encoder_hidden_states=dev(g["encoder_hidden_states"]), **extra).sample
            results.append((f"{name} unet {key}", rel(out, g[key])))
    for f in sorted(gold.glob("e2e_*.safetensors")):
        sched = f.stem[len("e2e_"):]
        if sched not in SCHEDULERS:
            print(f"skip {f.name}: no scheduler class for '{sched}'")
            continue
        e = load_file(f)
        pipe.scheduler = SCHEDULERS[sched].from_config(pipe.scheduler.config)
        pe = dev(e["prompt_embeds_cfg"])
        h, w = (e["image_uint8"].shape[1], e["image_uint8"].shape[2])
        kw = dict(prompt_embeds=pe[1:2], negative_prompt_embeds=pe[0:1], height=h, width=w,
                  num_inference_steps=E2E_STEPS, guidance_scale=E2E_GUIDANCE,
                  latents=dev(e["init_latents"].clone()), output_type="latent")
        if xl:
            te = dev(e["add_text_embeds_cfg"])
            kw.update(pooled_prompt_embeds=te[1:2], negative_pooled_prompt_embeds=te[0:1])
        with torch.no_grad():
            lat = pipe(**kw).images
        results.append((f"{name} {f.stem} latents_out", rel(lat, e["latents_out"])))

label = ("diffusers on the GPU, allow_tf32" if args.device == "cuda"
         else f"diffusers on the CPU, TF32 emulated ({args.rounding}, ops {args.ops}, fp32 kept: {args.keep_fp32 or 'none'})")
print(label)
fails = 0
for case, err in results:
    bad = err > args.tolerance
    fails += bad
    print(f"{'FAIL' if bad else 'pass'}  {case:48s} rel err {err:.3g} / tol {args.tolerance:g}")
unet = max((e for c, e in results if " unet " in c), default=0)
e2e = max((e for c, e in results if " e2e_" in c), default=0)
print(f"{len(results) - fails} passed, {fails} failed; max UNet {unet:.3g}, max e2e latents {e2e:.3g}")
