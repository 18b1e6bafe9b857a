#!/usr/bin/env python3
"""Builds the PyTorch checkpoint fixtures for DiffuseCoreTests (TorchCheckpointTests): files that
torch.save itself wrote, in the layouts people have, and every tensor they hold, flattened to the
names the reader should give them, in expected.safetensors (plus manifest.json: which file holds
which names, and the files that must be refused). The Swift tests never run Python.

    /path/to/venv-with-torch/bin/python make_torch_fixtures.py     (torch 2.x, safetensors, numpy)
"""
import argparse
import collections
import io
import json
import os
import pickle
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)


def write_zip64(archive, path):
    """The stored entries of `archive` in a zip64 archive, tensor data aligned to 64 bytes as torch
    aligns it."""
    import struct
    import zlib
    out, central = bytearray(), bytearray()
    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        infos = source.infolist()
        for info in infos:
            data, name = source.read(info.filename), info.filename.encode()
            offset = len(out)
            zip64 = struct.pack("<HHQQ", 1, 16, len(data), len(data))
            pad = -(offset + 30 + len(name) + len(zip64) + 4) % 64
            extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            crc = zlib.crc32(data)
            out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra))
            out += name + extra + data
            cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                                   len(name), len(cextra), 0, 0, 0, 0, 0xFFFFFFFF)
            central += name + cextra
    start = len(out)
    out += central
    record64 = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(infos), len(infos), len(central), start)
    out += struct.pack("<IIQI", 0x07064B50, 0, record64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(path, "wb") as f:
        f.write(out)


def main():
    expected, manifest = {}, {"files": [], "refused": []}

    def record(file, tensors, prefix=""):
        names = []
        for name, t in tensors.items():
            expected[f"{file}/{prefix}{name}"] = t.detach().contiguous().clone()
            names.append(prefix + name)
        manifest["files"].append({"file": file, "names": names})

    # A Lightning-style checkpoint: weights under "state_dict", with extras that are not tensors
    # (a step count, an argparse.Namespace, a numpy scalar) which a reader must not run.
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)
    sd = collections.OrderedDict()
    sd["model.layer.weight"] = torch.randn(2, 3)
    sd["model.layer.bias"] = torch.randn(3).half()
    sd["model.view.transposed"] = base.t()           # a strided view of a shared storage
    sd["model.view.row"] = base[1]                   # a view at an offset into it
    sd["model.scalar"] = torch.tensor(2.5)
    sd["model.parameter"] = torch.nn.Parameter(torch.randn(4))
    sd["model.steps"] = torch.tensor([1, 2, 3], dtype=torch.int64)
    sd["model.empty"] = torch.zeros(0, 3)
    sd["model.double"] = torch.randn(2, dtype=torch.float64)
    torch.save({"state_dict": sd, "global_step": 5, "epoch": 1,
                "hyper_parameters": {"args": argparse.Namespace(lr=0.1), "scale": np.float64(1.5)}},
               os.path.join(HERE, "lightning.ckpt"))
    record("lightning.ckpt", sd)

    # AUTOMATIC1111's textual-inversion embedding: nested dicts, the vectors a Parameter.
    vectors = torch.nn.Parameter(torch.randn(2, 8))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "fixture",
                "step": 10, "sd_checkpoint": "abc123", "sd_checkpoint_name": "model"},
               os.path.join(HERE, "embedding.pt"))
    record("embedding.pt", {"*": vectors}, prefix="string_to_param.")

    # diffusers' / transformers' .bin: a plain state dict, here with its entries re-compressed
    # (deflate) as a zip tool would.
    plain = {"conv.weight": torch.randn(2, 1, 3, 3), "norm.weight": torch.randn(2).half()}
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, \
            zipfile.ZipFile(os.path.join(HERE, "deflated.bin"), "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    record("deflated.bin", plain)

    # Zip64, as torch's writer makes it for files past 4 GiB: every size and offset at 0xFFFFFFFF
    # in the headers and the real values in zip64 extra fields, a zip64 end record and locator.
    # Rewritten by hand from a small torch.save (Python's zipfile only goes zip64 when it must).
    big = {"embed.weight": torch.randn(5, 4), "head.bias": torch.randn(3).to(torch.bfloat16)}
    buffer = io.BytesIO()
    torch.save(big, buffer)
    write_zip64(buffer.getvalue(), os.path.join(HERE, "zip64.pth"))
    assert all(torch.equal(v, big[k]) for k, v in torch.load(os.path.join(HERE, "zip64.pth")).items())
    record("zip64.pth", big)

    # The format before torch 1.6 (a bare pickle stream): refused by name.
    torch.save({"w": torch.ones(2)}, os.path.join(HERE, "legacy.pt"), _use_new_zipfile_serialization=False)
    manifest["refused"].append({"file": "legacy.pt", "message": "before torch 1.6"})

    # A damaged archive: the zip directory cut off.
    with open(os.path.join(HERE, "lightning.ckpt"), "rb") as f:
        whole = f.read()
    with open(os.path.join(HERE, "cut.ckpt"), "wb") as f:
        f.write(whole[:-30])
    manifest["refused"].append({"file": "cut.ckpt", "message": "damaged zip"})

    # A checkpoint whose pickle would run a shell command when unpickled (os.system): read as
    # data, the call is an opaque value and the file holds no tensors.
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    with zipfile.ZipFile(os.path.join(HERE, "payload.pt"), "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": Payload()}, protocol=2))
    manifest["refused"].append({"file": "payload.pt", "message": "holds no tensors"})

    save_file(expected, os.path.join(HERE, "expected.safetensors"))
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"torch {torch.__version__}: {len(expected)} tensors in {len(manifest['files'])} files")


if __name__ == "__main__":
    main()
