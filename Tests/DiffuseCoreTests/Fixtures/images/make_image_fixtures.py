#!/usr/bin/env python3
"""Builds the image fixtures for DiffuseCoreTests (PNG/JPEG decoding, PIL-compatible resize,
VaeImageProcessor conversions). The Swift tests read manifest.json and expected.safetensors;
they never run Python.

Encoders and the reference decoder are other people's: Pillow (libpng-free zlib writer,
libjpeg-turbo), ImageMagick 6 (libpng: Adam7, 16-bit, low-bit-depth gray) and libjpeg-turbo's
cjpeg (4:4:0 / 4:1:1 sampling, scan scripts, RGB and arithmetic-coded JPEG). Expected pixels
are what Pillow decodes, checked here against the source arrays wherever the format is lossless.

    python3 -m venv /tmp/imgvenv && /tmp/imgvenv/bin/pip install pillow==13.0.0 numpy diffusers==0.42.1 torch
    apt-get install imagemagick libjpeg-turbo-progs
    /tmp/imgvenv/bin/python make_image_fixtures.py
"""
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
import zlib

import numpy as np
import PIL
from PIL import Image, ImageOps, PngImagePlugin, features

HERE = os.path.dirname(os.path.abspath(__file__))
CONVERT = "/usr/bin/convert"   # ImageMagick 6 (libpng)
STABLE = ["-define", "png:exclude-chunks=date,time"]   # no timestamps: the files regenerate byte for byte
CJPEG = "cjpeg"                # libjpeg-turbo
tensors = {}                   # name -> numpy array, written to expected.safetensors
manifest = {
    "generator": "make_image_fixtures.py",
    "reference_decoder": f"Pillow {PIL.__version__} with libjpeg-turbo {features.version('libjpeg_turbo')}",
    "png": [], "jpeg": [], "load": [], "resize": [], "preprocess": [], "postprocess": [], "mask": [],
    "fit": [], "mask_crop": [],
}
rng = np.random.default_rng(20240611)


def source_rgb(w, h):
    """Gradients, noise and hard edges: exercises every filter type and the resampler's clipping."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 128 / max(w + h - 2, 1)], -1)
    img = img + rng.normal(0, 24, img.shape)
    img[h // 4: h // 2, w // 5: w // 2] = [250, 10, 30]      # a saturated block with sharp edges
    img[(3 * h) // 4:, (2 * w) // 3:] = [0, 0, 0]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write(rel, data):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def png_header(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return {"bit_depth": depth, "color_type": color, "interlaced": bool(interlace)}


def png_natural(im, data):
    """What the Swift reader returns: 8-bit samples, palette expanded, a tRNS key as alpha."""
    hdr = png_header(data)
    if im.mode == "P":
        return np.array(im.convert("RGBA" if "transparency" in im.info else "RGB"))
    if im.mode in ("I;16", "I;16B", "I"):
        a = np.array(im).astype(np.uint32) >> 8
        return a.astype(np.uint8)[..., None]
    if im.mode == "1":
        return (np.array(im).astype(np.uint8) * 255)[..., None]
    a = np.array(im)
    if a.ndim == 2:
        a = a[..., None]
    if hdr["color_type"] == 4 and im.mode == "RGBA":   # Pillow opens 16-bit gray+alpha as RGBA
        assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
        a = a[..., [0, 3]]
    if "transparency" in im.info and im.mode in ("L", "RGB"):
        key = im.info["transparency"]
        raw = np.array(Image.open(io.BytesIO(data)))  # samples at file depth (8 here)
        if im.mode == "L":
            alpha = np.where(raw == key, 0, 255).astype(np.uint8)
        else:
            alpha = np.where(np.all(raw == np.array(key), -1), 0, 255).astype(np.uint8)
        a = np.concatenate([a, alpha[..., None]], -1)
    return a


def add_png(name, data, source, expected=None, text=None):
    rel = f"png/{name}.png"
    write(rel, data)
    im = Image.open(io.BytesIO(data))
    im.load()
    decoded = png_natural(im, data)
    if expected is not None:
        assert decoded.shape == expected.shape and np.array_equal(decoded, expected), name
    key = f"png_{name}"
    tensors[key] = decoded
    entry = {"file": rel, "expected": key, "encoder": source, **png_header(data)}
    if text is not None:
        assert [(k, v) for k, v in text] == [(k, im.text[k]) for k, _ in text]
        entry["text"] = [[k, v] for k, v in text]
    manifest["png"].append(entry)


def pil_png(im, **kw):
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


def magick_png(src_png, *args, out_format="PNG"):
    with tempfile.TemporaryDirectory() as d:
        i, o = os.path.join(d, "in.png"), os.path.join(d, "out.png")
        with open(i, "wb") as f:
            f.write(src_png)
        subprocess.run([CONVERT, i, *args, *STABLE, f"{out_format}:{o}"], check=True)
        with open(o, "rb") as f:
            return f.read()


def make_pngs():
    w, h = 13, 11
    rgb = source_rgb(w, h)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[0, :4] = [0, 255, 0, 255]
    gray = np.array(Image.fromarray(rgb).convert("L"))
    rgba = np.dstack([rgb, alpha])
    gray16 = (gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape)).astype(np.uint16)

    # Pillow-written PNGs.
    add_png("gray8", pil_png(Image.fromarray(gray)), "Pillow", gray[..., None])
    add_png("gray1", pil_png(Image.fromarray(gray).point(lambda v: 255 if v > 110 else 0).convert("1")), "Pillow")
    add_png("gray16", pil_png(Image.fromarray(gray16)), "Pillow", (gray16 >> 8).astype(np.uint8)[..., None])
    add_png("gray_alpha8", pil_png(Image.fromarray(np.dstack([gray, alpha]), "LA")), "Pillow", np.dstack([gray, alpha]))
    add_png("rgb8", pil_png(Image.fromarray(rgb)), "Pillow", rgb)
    add_png("rgba8", pil_png(Image.fromarray(rgba)), "Pillow", rgba)
    key = int(gray[5, 5])
    add_png("gray8_trns", pil_png(Image.fromarray(gray), transparency=key), "Pillow")
    add_png("rgb8_trns", pil_png(Image.fromarray(rgb), transparency=tuple(int(v) for v in rgb[2, 3])), "Pillow")
    pal = Image.fromarray(rgb).quantize(colors=200)
    add_png("palette8", pil_png(pal), "Pillow")
    for bits, colors in ((4, 16), (2, 4), (1, 2)):
        p = Image.fromarray(rgb).quantize(colors=colors)
        add_png(f"palette{bits}_trns", pil_png(p, bits=bits, transparency=1), "Pillow")

    # Text chunks the way PIL writes them: tEXt, zTXt, iTXt (plain and compressed).
    info = PngImagePlugin.PngInfo()
    text = [("parameters", "a photo of a cat, Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42"),
            ("Latin1", "caf\u00e9 cr\u00e8me \u00bd"),
            ("Comment", "compressed " * 20),
            ("prompt", "\u732b\u306e\u5199\u771f \U0001F431 na\u00efve"),
            ("zipped", "\u00fcber \u2014 compressed iTXt " * 5)]
    info.add_text(*text[0]); info.add_text(*text[1]); info.add_text(*text[2], zip=True)
    info.add_text(*text[3]); info.add_text(*text[4], zip=True)
    add_png("text_chunks", pil_png(Image.fromarray(rgb[:4, :5]), pnginfo=info), "Pillow", rgb[:4, :5], text=text)

    # libpng (ImageMagick) PNGs: Adam7, 16-bit colour, 2/4-bit gray, palette.
    rgb16 = (rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape)).astype(np.uint16)
    with tempfile.TemporaryDirectory() as d:
        ppm = os.path.join(d, "in16.ppm")
        with open(ppm, "wb") as f:   # 16-bit PPM: ImageMagick keeps all 16 bits
            f.write(b"P6 %d %d 65535\n" % (w, h) + rgb16.astype(">u2").tobytes())
        out = os.path.join(d, "rgb16.png")
        subprocess.run([CONVERT, ppm, "-depth", "16", *STABLE, out], check=True)
        rgb16_png = open(out, "rb").read()
        out = os.path.join(d, "rgb16_adam7.png")
        subprocess.run([CONVERT, ppm, "-depth", "16", "-interlace", "PNG", *STABLE, out], check=True)
        rgb16_adam7 = open(out, "rb").read()
    add_png("rgb16", rgb16_png, "ImageMagick", (rgb16 >> 8).astype(np.uint8))
    add_png("rgb16_adam7", rgb16_adam7, "ImageMagick", (rgb16 >> 8).astype(np.uint8))
    add_png("rgb8_adam7", magick_png(pil_png(Image.fromarray(rgb)), "-interlace", "PNG", out_format="PNG24"),
            "ImageMagick", rgb)
    add_png("rgba16_adam7", magick_png(pil_png(Image.fromarray(rgba)), "-depth", "16", "-interlace", "PNG",
                                       out_format="PNG64"), "ImageMagick", rgba)
    g4 = (gray >> 4) * 17
    add_png("gray4_adam7", magick_png(pil_png(Image.fromarray(g4)), "-interlace", "PNG", "-depth", "4"),
            "ImageMagick", g4[..., None])
    g2 = (gray >> 6) * 85
    add_png("gray2", magick_png(pil_png(Image.fromarray(g2)), "-depth", "2"), "ImageMagick", g2[..., None])
    add_png("palette_adam7", magick_png(pil_png(pal.convert("RGB")), "-interlace", "PNG", out_format="PNG8"),
            "ImageMagick", np.array(pal.convert("RGB")))
    ga16 = np.dstack([gray16, (alpha.astype(np.uint16) * 257)])
    with tempfile.TemporaryDirectory() as d:
        pam = os.path.join(d, "in.pam")
        with open(pam, "wb") as f:
            f.write(b"P7\nWIDTH %d\nHEIGHT %d\nDEPTH 2\nMAXVAL 65535\nTUPLTYPE GRAYSCALE_ALPHA\nENDHDR\n" % (w, h)
                    + ga16.astype(">u2").tobytes())
        out = os.path.join(d, "ga16.png")
        subprocess.run([CONVERT, pam, "-depth", "16", "-interlace", "PNG", *STABLE, out], check=True)
        ga16_png = open(out, "rb").read()
    add_png("gray_alpha16_adam7", ga16_png, "ImageMagick", (ga16 >> 8).astype(np.uint8))

    # EXIF orientation in eXIf chunks: Image.load must match ImageOps.exif_transpose.
    small = source_rgb(5, 3)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        rel = f"png/orientation{o}.png"
        data = pil_png(Image.fromarray(small), exif=exif)
        write(rel, data)
        im = Image.open(io.BytesIO(data))
        key = f"load_orientation{o}"
        tensors[key] = np.array(ImageOps.exif_transpose(im).convert("RGB"))
        manifest["load"].append({"file": rel, "expected": key, "orientation": o})


def add_jpeg(name, data, source, tolerance=0):
    rel = f"jpeg/{name}.jpg"
    write(rel, data)
    im = Image.open(io.BytesIO(data))
    a = np.array(im)
    if a.ndim == 2:
        a = a[..., None]
    key = f"jpeg_{name}"
    tensors[key] = a
    manifest["jpeg"].append({"file": rel, "expected": key, "encoder": source, "tolerance": tolerance,
                             "progressive": bool(im.info.get("progressive", 0))})
    return im


def pil_jpeg(im, **kw):
    b = io.BytesIO()
    im.save(b, "JPEG", **kw)
    return b.getvalue()


def cjpeg(rgb, *args):
    with tempfile.TemporaryDirectory() as d:
        i = os.path.join(d, "in.ppm")
        Image.fromarray(rgb).save(i)
        return subprocess.run([CJPEG, *args, i], check=True, capture_output=True).stdout


def make_jpegs():
    rgb = source_rgb(27, 19)
    im = Image.fromarray(rgb)
    add_jpeg("baseline_420", pil_jpeg(im, quality=90), "Pillow")
    add_jpeg("baseline_422", pil_jpeg(im, quality=90, subsampling="4:2:2"), "Pillow")
    add_jpeg("baseline_444", pil_jpeg(im, quality=95, subsampling="4:4:4"), "Pillow")
    add_jpeg("gray", pil_jpeg(im.convert("L"), quality=90), "Pillow")
    add_jpeg("progressive_420", pil_jpeg(im, quality=85, progressive=True), "Pillow")
    add_jpeg("progressive_444_restart", pil_jpeg(im, quality=80, progressive=True, subsampling="4:4:4",
                                                 restart_marker_blocks=3), "Pillow")
    add_jpeg("baseline_restart_rows", pil_jpeg(im, quality=75, restart_marker_rows=1), "Pillow")
    add_jpeg("cjpeg_440", cjpeg(rgb, "-sample", "1x2,1x1,1x1", "-quality", "90"), "cjpeg")
    add_jpeg("cjpeg_411", cjpeg(rgb, "-sample", "4x1,1x1,1x1", "-quality", "90"), "cjpeg")
    add_jpeg("cjpeg_progressive_422_optimized", cjpeg(rgb, "-progressive", "-sample", "2x1", "-optimize",
                                                      "-restart", "2B"), "cjpeg")
    add_jpeg("cjpeg_rgb", cjpeg(rgb, "-rgb", "-quality", "92"), "cjpeg")
    with tempfile.TemporaryDirectory() as d:   # sequential, one scan per component (non-interleaved)
        script = os.path.join(d, "scans.txt")
        open(script, "w").write("0;\n1;\n2;\n")
        add_jpeg("cjpeg_noninterleaved", cjpeg(rgb, "-scans", script, "-quality", "90"), "cjpeg")
    tiny = source_rgb(3, 5)   # chroma 2 samples wide: libjpeg falls back to box upsampling
    add_jpeg("tiny_3x5_420", pil_jpeg(Image.fromarray(tiny), quality=90), "Pillow")
    add_jpeg("one_pixel", pil_jpeg(Image.fromarray(tiny[:1, :1]), quality=90), "Pillow")
    # A phone-style EXIF orientation: decoded as stored, and upright through Image.load.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = pil_jpeg(im, quality=90, exif=exif)
    add_jpeg("exif_orientation6", data, "Pillow")
    key = "load_jpeg_orientation6"
    tensors[key] = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    manifest["load"].append({"file": "jpeg/exif_orientation6.jpg", "expected": key, "orientation": 6})
    # Valid JPEG that is not supported: arithmetic coding.
    write("jpeg/unsupported_arithmetic.jpg", cjpeg(rgb[:8, :8], "-arithmetic"))
    manifest["unsupported"] = [{"file": "jpeg/unsupported_arithmetic.jpg", "problem": "arithmetic"}]


def make_resize():
    rgb = np.array(Image.open(os.path.join(HERE, "png/rgb8.png")))
    rgba = np.array(Image.open(os.path.join(HERE, "png/rgba8.png")))
    gray = np.array(Image.open(os.path.join(HERE, "png/gray8.png")))
    src = {"png/rgb8.png": rgb, "png/rgba8.png": rgba, "png/gray8.png": gray}
    cases = [("png/rgb8.png", 6, 5, "lanczos"), ("png/rgb8.png", 29, 23, "lanczos"), ("png/rgb8.png", 7, 22, "lanczos"),
             ("png/rgb8.png", 13, 4, "lanczos"), ("png/rgb8.png", 10, 3, "lanczos"), ("png/rgb8.png", 12, 2, "bicubic"), ("png/rgb8.png", 3, 11, "lanczos"), ("png/rgb8.png", 1, 1, "lanczos"),
             ("png/rgb8.png", 6, 5, "bicubic"), ("png/rgb8.png", 20, 17, "bicubic"), ("png/rgb8.png", 6, 5, "bilinear"),
             ("png/rgb8.png", 6, 5, "box"), ("png/rgb8.png", 6, 5, "hamming"),
             ("png/gray8.png", 9, 4, "lanczos"), ("png/rgba8.png", 6, 5, "lanczos"), ("png/rgba8.png", 21, 15, "lanczos"),
             ("png/rgba8.png", 9, 3, "lanczos")]
    filters = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
               "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
    for path, w, h, f in cases:
        out = np.array(Image.fromarray(src[path]).resize((w, h), resample=filters[f]))
        key = f"resize_{os.path.basename(path)[:-4]}_{w}x{h}_{f}"
        tensors[key] = out if out.ndim == 3 else out[..., None]
        manifest["resize"].append({"source": path, "width": w, "height": h, "filter": f, "expected": key})


def make_processor():
    # VaeImageProcessor.preprocess (PIL path) on a larger image: default size (floored to 8),
    # then an explicit one. numpy float32 arithmetic equals torch's for these elementwise ops.
    big = source_rgb(37, 29)
    write("png/preprocess_source.png", pil_png(Image.fromarray(big)))
    for height, width in ((None, None), (16, 40)):
        im = Image.fromarray(big)
        h = (height or im.height) // 8 * 8
        w = (width or im.width) // 8 * 8
        x = np.array(im.resize((w, h), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
        x = 2.0 * x[None].transpose(0, 3, 1, 2) - 1.0
        key = f"preprocess_{h}x{w}"
        tensors[key] = np.ascontiguousarray(x.astype(np.float32))
        manifest["preprocess"].append({"source": "png/preprocess_source.png", "height": height, "width": width,
                                       "vae_scale_factor": 8, "expected": key})
    # postprocess: decoded [-1, 1] tensor → uint8, with values on the rounding boundaries.
    x = (rng.normal(0, 0.7, (2, 3, 9, 7))).astype(np.float32)
    halves = ((np.arange(0, 255, dtype=np.float32) + 0.5) / 255.0 - 0.5) / 0.5   # x*255 near k + 0.5
    x.reshape(-1)[: halves.size // 2] = halves[::2][: halves.size // 2]
    x.reshape(-1)[-3:] = [-5.0, 5.0, -1.0]
    tensors["postprocess_input"] = x
    y = np.clip(x * np.float32(0.5) + np.float32(0.5), 0, 1)
    tensors["postprocess_uint8"] = (y.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    manifest["postprocess"].append({"input": "postprocess_input", "expected": "postprocess_uint8"})
    # The inpainting pipelines' mask_processor (do_normalize=False, do_binarize=True,
    # do_convert_grayscale=True): resize (LANCZOS) in the image's own mode, then convert("L"),
    # / 255, and 0 below 0.5, 1 from 0.5 up. The source has levels around 127/128 in each channel
    # and unequal channels, so the order of resize and gray and the threshold all show.
    ramp = np.clip(source_rgb(37, 29).astype(np.int32) // 2 + 64, 0, 255).astype(np.uint8)
    write("png/mask_source.png", pil_png(Image.fromarray(ramp)))
    for height, width in ((None, None), (16, 40)):
        im = Image.fromarray(ramp)
        h = (height or im.height) // 8 * 8
        w = (width or im.width) // 8 * 8
        gray = im.resize((w, h), resample=Image.Resampling.LANCZOS).convert("L")
        x = np.array(gray).astype(np.float32) / 255.0
        x = np.where(x < 0.5, 0.0, 1.0).astype(np.float32)[None, None]
        key = f"mask_{h}x{w}"
        tensors[key] = np.ascontiguousarray(x)
        manifest["mask"].append({"source": "png/mask_source.png", "height": height, "width": width,
                                 "vae_scale_factor": 8, "expected": key})


def make_mask_crop():
    """Inpainting only the masked area (diffusers' `padding_mask_crop`), through diffusers' own
    VaeImageProcessor: get_crop_region, preprocess with the crop and resize_mode "fill" (image and
    mask), and apply_overlay pasting a generated picture back; also _resize_and_fill and
    _resize_and_crop alone, and PIL resizes of a box (the fill's zero-height edge boxes among them)."""
    from diffusers.image_processor import VaeImageProcessor
    local = np.random.default_rng(20261124)  # its own stream: the fixtures above stay as they were
    image_processor = VaeImageProcessor(vae_scale_factor=8)
    mask_processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    rgb = Image.open(os.path.join(HERE, "png/rgb8.png"))
    rgba = Image.open(os.path.join(HERE, "png/rgba8.png"))
    for name, im, w, h, box, f in [("rgb8", rgb, 13, 4, (0, 0, 13, 0), "bicubic"), ("rgb8", rgb, 13, 3, (0, 11, 13, 11), "bicubic"),
                                   ("rgb8", rgb, 5, 11, (0, 0, 0, 11), "bicubic"), ("rgb8", rgb, 2, 11, (13, 0, 13, 11), "bicubic"),
                                   ("rgb8", rgb, 9, 7, (1.5, 2, 11, 10.25), "lanczos"), ("rgba8", rgba, 13, 2, (0, 11, 13, 11), "bicubic")]:
        resample = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[f]
        out = np.array(im.resize((w, h), resample=resample, box=box))
        key = f"resize_{name}_{w}x{h}_box_" + "_".join(str(v).replace(".", "p") for v in box)
        tensors[key] = out
        manifest["resize"].append({"source": f"png/{name}.png", "width": w, "height": h, "filter": f, "box": list(box),
                                   "expected": key})
    for name, im in [("rgb8", rgb), ("rgba8", rgba), ("gray8", Image.open(os.path.join(HERE, "png/gray8.png")))]:
        for w, h in [(24, 8), (8, 24), (26, 22), (7, 9)]:
            for mode, fit in [("fill", image_processor._resize_and_fill), ("crop", image_processor._resize_and_crop)]:
                key = f"{mode}_{name}_{w}x{h}"
                tensors[key] = np.array(fit(im, w, h))
                manifest["fit"].append({"source": f"png/{name}.png", "width": w, "height": h, "mode": mode, "expected": key})

    # A 37x29 picture and soft-edged masks: a blob near the bottom edge (so the aspect-ratio growth
    # must shift), and a faint one-pixel mark far off (any non-black pixel counts for the region).
    source = Image.open(os.path.join(HERE, "png/preprocess_source.png"))
    y, x = np.mgrid[0:29, 0:37].astype(np.float32)
    masks = {}
    for name, (cy, cx, ry, rx), mark in [("crop_mask_low", (23, 10, 5, 7), None), ("crop_mask_mark", (8, 27, 4, 3), (26, 2)),
                                         ("crop_mask_wide", (14, 18, 3, 15), None)]:
        soft = np.clip((1.25 - np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)) / 0.5, 0, 1)
        m = (soft[..., None] * np.array([1.0, 0.85, 0.6], np.float32) * 255).round().astype(np.uint8)
        if mark:
            m[mark[0], mark[1]] = [1, 0, 0]   # luma 0: invisible to the region; [0, 3, 0] is luma 2
            m[mark[0] - 1, mark[1] + 1] = [0, 3, 0]
        masks[name] = Image.fromarray(m, "RGB")
        write(f"png/{name}.png", pil_png(masks[name]))
    for mask_name, width, height, pad in [("crop_mask_low", 32, 32, 0), ("crop_mask_low", 48, 24, 3), ("crop_mask_low", 16, 40, 2),
                                          ("crop_mask_mark", 32, 32, 1), ("crop_mask_mark", 40, 16, 0), ("crop_mask_wide", 24, 32, 4),
                                          ("crop_mask_wide", 64, 16, 0), ("crop_mask_low", 56, 48, 40)]:
        mask = masks[mask_name]
        region = image_processor.get_crop_region(mask, width, height, pad=pad)
        key = f"mask_crop_{mask_name}_{width}x{height}_pad{pad}"
        # What the pipeline preprocesses, stored as the 8-bit picture it is (and the 0/1 mask as
        # uint8): preprocess = that picture / 255 · 2 − 1, which the other cases check.
        pixels = image_processor.preprocess(source, height=height, width=width, crops_coords=region, resize_mode="fill")
        picture = np.asarray(image_processor._resize_and_fill(source.crop(region), width, height))
        assert np.array_equal(pixels[0].permute(1, 2, 0).numpy(), (picture.astype(np.float32) / 255.0) * 2.0 - 1.0), key
        tensors[key + "_image"] = picture
        binary = mask_processor.preprocess(mask, height=height, width=width, crops_coords=region, resize_mode="fill")
        tensors[key + "_mask"] = np.ascontiguousarray(binary[0, 0].numpy().astype(np.uint8))
        generated = local.integers(0, 256, (height, width, 3), dtype=np.uint8)
        tensors[key + "_generated"] = generated
        tensors[key + "_overlay"] = np.array(image_processor.apply_overlay(mask, source, Image.fromarray(generated), region))
        manifest["mask_crop"].append({"image": "png/preprocess_source.png", "mask": f"png/{mask_name}.png", "width": width,
                                      "height": height, "padding": pad, "region": [int(v) for v in region], "expected": key})
    # apply_overlay without a crop: the generated picture already has the image's size.
    generated = local.integers(0, 256, (29, 37, 3), dtype=np.uint8)
    tensors["overlay_uncropped_generated"] = generated
    tensors["overlay_uncropped"] = np.array(image_processor.apply_overlay(masks["crop_mask_low"], source, Image.fromarray(generated)))
    manifest["overlay"] = [{"image": "png/preprocess_source.png", "mask": "png/crop_mask_low.png",
                            "generated": "overlay_uncropped_generated", "expected": "overlay_uncropped"}]


def write_safetensors(path, arrays):
    header, blobs, offset = {}, [], 0
    dtypes = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        b = a.tobytes()
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


if __name__ == "__main__":
    for d in ("png", "jpeg"):
        shutil.rmtree(os.path.join(HERE, d), ignore_errors=True)
    make_pngs()
    make_jpegs()
    make_resize()
    make_processor()
    make_mask_crop()
    write_safetensors(os.path.join(HERE, "expected.safetensors"), tensors)
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{len(tensors)} tensors, {len(manifest['png'])} PNG, {len(manifest['jpeg'])} JPEG cases")
