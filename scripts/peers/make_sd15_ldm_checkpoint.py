"""A random-weight Stable Diffusion checkpoint in the original single-file LDM layout, for peers
(stable-diffusion.cpp) that load only that layout. Timings do not depend on weight values.

The models are built by diffusers/transformers from the real configs (default: SD 1.5 from
../../shared/data/configs/sd15) with PyTorch's random init, renamed to the LDM keys
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`),
and saved as one .safetensors. The renaming is the project's LDMKeyTables run backwards (the
tables follow diffusers' single_file_utils.py). Before saving, the file's state dict is converted
back with diffusers' own `convert_ldm_*_checkpoint` and must give every original tensor back
unchanged, so a wrong key or shape fails here rather than inside the peer.

  /work/peers/diffusers-venv/bin/python scripts/peers/make_sd15_ldm_checkpoint.py \
      --out /work/peers/sd15-random.safetensors [--dtype fp32|fp16] [--taesd-out /work/peers/taesd-random.safetensors]

Only SD 1.x (OpenAI CLIP text encoder, no SDXL conditioning) is written; other configs are refused.
"""
import argparse, json, os, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = HERE.parent.parent.parent / "shared" / "data" / "configs" / "sd15"


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=str(DEFAULT_CONFIGS), help="diffusers model folder with unet/, vae/, text_encoder/ configs")
    p.add_argument("--out", required=True, help="the .safetensors file to write (outside the repository: it is ~4.3 GB in fp32)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="skip the round trip through diffusers' converters")
    p.add_argument("--taesd-out", help="also write random tiny-autoencoder (TAESD) weights here, in the diffusers names "
                                        "TAESD ships and sd.cpp's --taesd reads (config: --taesd-config)")
    p.add_argument("--taesd-config", default=str(DEFAULT_CONFIGS.parent / "taesd"))
    return p.parse_args()


# MARK: Key tables (LDM prefix, diffusers prefix, leaf renames), the LDMKeyTables of the project.

UNET_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
               "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
VAE_ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
SAME = None  # inner names identical in both layouts (attention transformers, convolutions)


def unet_rules(cfg):
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    n = len(down)
    layers = cfg.get("layers_per_block", 2)
    layers = layers if isinstance(layers, list) else [layers] * n
    if cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise SystemExit("unet config: added/class embeddings (SDXL, upscalers) are not written by this script")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise SystemExit(f"unet config: mid_block_type {cfg.get('mid_block_type')} is not written by this script")
    attn = lambda t: "CrossAttn" in t
    rules = [("time_embed.0.", "time_embedding.linear_1.", SAME), ("time_embed.2.", "time_embedding.linear_2.", SAME),
             ("input_blocks.0.0.", "conv_in.", SAME), ("out.0.", "conv_norm_out.", SAME), ("out.2.", "conv_out.", SAME),
             ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET), ("middle_block.1.", "mid_block.attentions.0.", SAME),
             ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)]
    k = 1
    for i in range(n):
        for j in range(layers[i]):
            rules.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET))
            if attn(down[i]):
                rules.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.", SAME))
            k += 1
        if i < n - 1:
            rules.append((f"input_blocks.{k}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", SAME))
            k += 1
    k = 0
    for i in range(n):  # up block i mirrors down block n-1-i with one more layer
        count = layers[n - 1 - i] + 1
        for j in range(count):
            rules.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", UNET_RESNET))
            if attn(up[i]):
                rules.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", SAME))
            if j == count - 1 and i < n - 1:
                slot = 2 if attn(up[i]) else 1
                rules.append((f"output_blocks.{k}.{slot}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", SAME))
            k += 1
    return rules


def vae_rules(cfg):
    n = len(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 1)
    rules = [("quant_conv.", "quant_conv.", SAME), ("post_quant_conv.", "post_quant_conv.", SAME)]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in.", SAME), (f"{part}.norm_out.", f"{part}.conv_norm_out.", SAME),
                  (f"{part}.conv_out.", f"{part}.conv_out.", SAME),
                  (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
                  (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET)]
        if cfg.get("mid_block_add_attention", True):
            rules.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION))
    for i in range(n):
        for j in range(layers):
            rules.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET))
        if i < n - 1:
            rules.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", SAME))
    for i in range(n):  # LDM numbers the decoder from the lowest resolution up, diffusers the other way
        ldm = n - 1 - i
        for j in range(layers + 1):
            rules.append((f"decoder.up.{ldm}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", VAE_RESNET))
        if i < n - 1:
            rules.append((f"decoder.up.{ldm}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.", SAME))
    return rules


def to_ldm(state, rules, ldm_prefix, component):
    """Renames a diffusers state dict to LDM keys; every key must be claimed by exactly one rule."""
    by_length = sorted(rules, key=lambda r: -len(r[1]))
    out = {}
    for key, tensor in state.items():
        rule = next((r for r in by_length if key.startswith(r[1])), None)
        if rule is None:
            raise SystemExit(f"{component}: no LDM rule for diffusers key {key}")
        ldm, dif, leaves = rule
        rest = key[len(dif):]
        if leaves is not None:
            leaf = next((l for l in sorted(leaves, key=lambda s: -len(leaves[s])) if rest.startswith(leaves[l])), None)
            if leaf is not None:
                rest = leaf + rest[len(leaves[leaf]):]
            elif leaves is UNET_RESNET:
                raise SystemExit(f"{component}: resnet key {key} has no LDM name")
        # The VAE's LDM attention uses 1x1 convolutions where diffusers has linear layers.
        if leaves is VAE_ATTENTION and rest.endswith(".weight") and rest.split(".")[0] in ("q", "k", "v", "proj_out"):
            tensor = tensor[:, :, None, None]
        name = ldm_prefix + ldm + rest
        if name in out:
            raise SystemExit(f"{component}: two diffusers keys map to {name}")
        out[name] = tensor
    return out


def check_round_trip(ldm, originals, configs):
    """diffusers' own LDM → diffusers converters must give back every original tensor unchanged."""
    import torch
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    # The names the LDM loaders (diffusers' infer_diffusers_model_type, sd.cpp's get_sd_version) look for.
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.decoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        if key not in ldm:
            raise SystemExit(f"LDM layout: {key} is missing")
    back = dict(unet=convert_ldm_unet_checkpoint(ldm, configs["unet"]),
                vae=convert_ldm_vae_checkpoint(ldm, configs["vae"]),
                text_encoder=convert_ldm_clip_checkpoint(ldm))
    for name, original in originals.items():
        got = back[name]
        missing, extra = set(original) - set(got), set(got) - set(original)
        if missing or extra:
            raise SystemExit(f"round trip {name}: missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}")
        for k, t in original.items():
            g = got[k].reshape(t.shape) if got[k].numel() == t.numel() else got[k]
            if g.shape != t.shape or not torch.equal(g, t):
                raise SystemExit(f"round trip {name}: tensor {k} differs ({tuple(got[k].shape)} vs {tuple(t.shape)})")
        print(f"round trip {name}: {len(original)} tensors identical", file=sys.stderr)


def main():
    a = parse()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = Path(a.configs)
    configs = {c: json.loads((cfg / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}
    if configs["unet"].get("cross_attention_dim") != configs["text_encoder"].get("hidden_size"):
        raise SystemExit(f"{cfg}: unet cross_attention_dim does not match the text encoder's hidden_size")
    if configs["text_encoder"].get("hidden_act") != "quick_gelu":
        raise SystemExit(f"{cfg}: the text encoder is not OpenAI CLIP (SD 1.x); this script writes SD 1.x only")

    t = time.perf_counter()
    with torch.no_grad():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")).eval()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")).eval()
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder")).eval()
    # Checkpoints name the text encoder's weights `text_model.*` (transformers 5 drops that level
    # in the module tree and maps it on load); the LDM layout nests those names.
    text_model = lambda k: k if k.startswith("text_model.") else "text_model." + k
    originals = dict(unet=unet.state_dict(), vae=vae.state_dict(),
                     text_encoder={text_model(k): v for k, v in te.state_dict().items() if not k.endswith("position_ids")})
    print(f"random models built in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    ldm = {}
    ldm.update(to_ldm(originals["unet"], unet_rules(configs["unet"]), "model.diffusion_model.", "unet"))
    ldm.update(to_ldm(originals["vae"], vae_rules(configs["vae"]), "first_stage_model.", "vae"))
    ldm.update({"cond_stage_model.transformer." + k: v for k, v in originals["text_encoder"].items()})
    if not a.no_check:
        check_round_trip(ldm, originals, configs)

    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    if a.taesd_out:
        from diffusers import AutoencoderTiny
        tiny = AutoencoderTiny.from_config(AutoencoderTiny.load_config(a.taesd_config)).eval()
        save_file({k: v.to(dtype).contiguous() for k, v in tiny.state_dict().items()}, a.taesd_out,
                  metadata={"format": "pt", "weights": "random", "configs": a.taesd_config})
        print(json.dumps(dict(file=a.taesd_out, tensors=len(tiny.state_dict()), dtype=a.dtype)))
    ldm = {k: v.to(dtype).contiguous() for k, v in ldm.items()}
    del unet, vae, te, originals
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm, str(out), metadata={"format": "pt", "generator": "diffuse scripts/peers/make_sd15_ldm_checkpoint.py",
                                       "configs": str(cfg), "seed": str(a.seed), "weights": "random"})
    params = sum(v.numel() for v in ldm.values())
    print(json.dumps(dict(file=str(out), tensors=len(ldm), parameters=params, dtype=a.dtype,
                          bytes=os.path.getsize(out))))


if __name__ == "__main__":
    main()
