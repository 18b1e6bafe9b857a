"""Recompute the reference goldens with diffusers on this GPU in fp16 or bf16.

Writes a fixture folder of the shared/reference layout (golden/<variant>/*.safetensors with the
same tensor names, float32 on disk; models/ linked to the original) whose outputs diffusers
computed on the GPU in the given precision, from the SAME inputs as the CPU goldens. The engine
is then checked against it with `diffuse check-reference --reference OUT --precision fp16`.

  python3 make_gpu_goldens.py REFERENCE_DIR OUT_DIR fp16|bf16
"""
import json, os, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from diffusers import (AutoencoderTiny, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

ref, out, prec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[prec]
dev = "cuda"
out.mkdir(parents=True, exist_ok=True)
if not (out / "models").exists():
    os.symlink(ref.resolve() / "models", out / "models")
shutil.copy(ref / "README.md", out / "README.md")


def f32(d):
    return {k: v.detach().to(torch.float32).cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
            for k, v in d.items()}


@torch.no_grad()
def variant(name):
    gold = ref / "golden" / name
    dst = out / "golden" / name
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(gold / "prompts.json", dst / "prompts.json")
    cls = StableDiffusionXLPipeline if (ref / "models" / name / "text_encoder_2").exists() else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(ref / "models" / name), torch_dtype=dtype).to(dev)
    pipe.set_progress_bar_config(disable=True)
    # Text encoders.
    for te_name in ["text_encoder", "text_encoder_2"]:
        te = getattr(pipe, te_name, None)
        if te is None or not (gold / f"{te_name}.safetensors").exists():
            continue
        g = load_file(str(gold / f"{te_name}.safetensors"))
        o = te(g["input_ids"].to(dev), output_hidden_states=True)
        d = {"input_ids": g["input_ids"], "last_hidden_state": o.last_hidden_state,
             "hidden_states_penultimate": o.hidden_states[-2],
             "clip_skip_1": getattr(te, "text_model", te).final_layer_norm(o.hidden_states[-2])}
        if hasattr(o, "text_embeds") and o.text_embeds is not None:
            d["text_embeds"] = o.text_embeds
        else:
            d["pooler_output"] = o.pooler_output
        save_file(f32(d), str(dst / f"{te_name}.safetensors"))
    # UNet.
    g = load_file(str(gold / "unet.safetensors"))
    kw = {}
    if "text_embeds" in g:
        kw["added_cond_kwargs"] = {"text_embeds": g["text_embeds"].to(dev, dtype), "time_ids": g["time_ids"].to(dev, dtype)}
    d = {k: v for k, v in g.items() if not k.startswith(("noise_pred_", "debug_"))}
    for k in [k for k in g if k.startswith("noise_pred_")]:
        case = k[len("noise_pred_"):]
        t = g[f"timestep_{case}"].to(dev)
        t = t[0] if t.numel() == 1 else t
        d[k] = pipe.unet(g["sample"].to(dev, dtype), t, encoder_hidden_states=g["encoder_hidden_states"].to(dev, dtype), **kw).sample
    save_file(f32(d), str(dst / "unet.safetensors"))
    # VAE, as the pipeline runs it (upcast to fp32 in fp16 when the config says force_upcast).
    g = load_file(str(gold / "vae.safetensors"))
    vae = pipe.vae
    vdt = torch.float32 if dtype == torch.float16 and vae.config.force_upcast else dtype
    vae = vae.to(vdt)
    sf = vae.config.scaling_factor
    dist = vae.encode(g["image"].to(dev, vdt)).latent_dist
    d = dict(g, decoded=vae.decode(g["latents"].to(dev, vdt) / sf).sample, encode_mean=dist.mean, encode_logvar=dist.logvar)
    save_file(f32(d), str(dst / "vae.safetensors"))
    vae.to(dtype)
    if (gold / "vae_tiny.safetensors").exists():
        g = load_file(str(gold / "vae_tiny.safetensors"))
        vt = AutoencoderTiny.from_pretrained(str(ref / "models" / name / "vae_tiny"), torch_dtype=dtype).to(dev)
        d = dict(g, decoded=vt.decode(g["latents"].to(dev, dtype)).sample, encoded=vt.encode(g["image"].to(dev, dtype)).latents)
        save_file(f32(d), str(dst / "vae_tiny.safetensors"))
    # End to end, the same arguments as the CPU goldens.
    prompts = json.load(open(gold / "prompts.json"))
    for sname, scls in [("ddim", DDIMScheduler), ("pndm", PNDMScheduler), ("euler", EulerDiscreteScheduler)]:
        gf = gold / f"e2e_{sname}.safetensors"
        if not gf.exists():
            continue
        g = load_file(str(gf))
        pipe.scheduler = scls.from_config(pipe.scheduler.config)
        common = dict(prompt=prompts["e2e_prompt"], negative_prompt=prompts["e2e_negative_prompt"], height=64, width=64,
                      num_inference_steps=4, guidance_scale=7.5, latents=g["init_latents"].to(dev, dtype))
        lat = pipe(**common, output_type="latent").images
        img = pipe(**common, output_type="pil").images[0]
        import numpy as np
        d = {"init_latents": g["init_latents"], "latents_out": lat,
             "image_uint8": torch.from_numpy(np.array(img, dtype=np.uint8))[None]}
        save_file(f32(d), str(dst / f"e2e_{sname}.safetensors"))
    print(f"{name}: {prec} goldens written", flush=True)


for v in sorted(p.name for p in (ref / "golden").iterdir() if (ref / "models" / p.name / "model_index.json").exists()):
    variant(v)
