#!/usr/bin/env python3
"""Check installed models against models/manifest.toml with onnxruntime.

For every selected [[model]] entry:
  * runtime libraries named libonnxruntime.so.*: dlopen them and compare
    OrtGetApiBase()->GetVersionString() with source.version (provider plugins
    are only hash-checked: the CUDA one needs the CUDA libraries to load);
  * ONNX files: load with onnxruntime (CPU), compare input/output names, shapes
    (-1 = dynamic) and dtypes with the manifest, run one inference on random
    data (dynamic batch -> 2, other dynamic axes -> 64) and require finite
    outputs.

    python3 verify.py [--manifest models/manifest.toml] [--dir models] [--only a,b]

Run by `scripts/fetch-models --verify` inside its virtualenv (needs numpy and
onnxruntime). Exit status 0 when everything matches, 1 otherwise.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
          "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(double)": "float64"}


def ort_version_of(lib: Path) -> str:
    class OrtApiBase(ctypes.Structure):
        _fields_ = [("GetApi", ctypes.c_void_p), ("GetVersionString", ctypes.CFUNCTYPE(ctypes.c_char_p))]

    handle = ctypes.CDLL(str(lib.resolve()))
    handle.OrtGetApiBase.restype = ctypes.POINTER(OrtApiBase)
    return handle.OrtGetApiBase().contents.GetVersionString().decode()


def norm_shape(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def check_io(kind: str, actual, expected: list[dict], exhaustive: bool) -> list[str]:
    errs = []
    by_name = {a.name: a for a in actual}
    for exp in expected:
        a = by_name.get(exp["name"])
        if a is None:
            errs.append(f"{kind} {exp['name']!r} missing (model has {list(by_name)})")
            continue
        if norm_shape(a.shape) != exp["shape"]:
            errs.append(f"{kind} {exp['name']}: shape {a.shape}, manifest {exp['shape']}")
        if DTYPES.get(a.type, a.type) != exp["dtype"]:
            errs.append(f"{kind} {exp['name']}: dtype {a.type}, manifest {exp['dtype']}")
    extra = [n for n in by_name if n not in {e["name"] for e in expected}]
    if exhaustive and extra:
        errs.append(f"{kind}s not in the manifest: {extra}")
    return errs


def check_model(entry: dict, path: Path) -> tuple[list[str], str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    errs = check_io("input", sess.get_inputs(), entry["inputs"], exhaustive=True)
    errs += check_io("output", sess.get_outputs(), entry["outputs"], exhaustive=False)
    if errs:
        return errs, ""
    rng = np.random.default_rng(0)
    feeds = {}
    for i, inp in enumerate(entry["inputs"]):
        dims = [(2 if axis == 0 else 64) if d == -1 else d for axis, d in enumerate(inp["shape"])]
        feeds[inp["name"]] = rng.random(dims, dtype=np.float32).astype(inp["dtype"])
    names = [o["name"] for o in entry["outputs"]]
    t0 = time.monotonic()
    outs = sess.run(names, feeds)
    dt = time.monotonic() - t0
    for name, out in zip(names, outs):
        if not np.isfinite(out).all():
            errs.append(f"output {name} has non-finite values")
    shapes = ", ".join(f"{n} {list(o.shape)}" for n, o in zip(names, outs))
    ins = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    return errs, f"{ins} -> {shapes} in {dt:.2f} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="check installed models against the manifest")
    ap.add_argument("--manifest", default=str(Path(__file__).resolve().parents[2] / "models" / "manifest.toml"))
    ap.add_argument("--dir", default="./models")
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    with open(args.manifest, "rb") as f:
        manifest = tomllib.load(f)
    only = {n for n in args.only.split(",") if n}
    failures = 0
    for entry in manifest["model"]:
        if only and entry["name"] not in only:
            continue
        path = Path(args.dir) / entry["file"]
        if not path.exists():
            print(f"verify {entry['name']}: MISSING {path}")
            failures += 1
            continue
        try:
            if entry["kind"] == "runtime":
                if path.name.startswith("libonnxruntime.so"):
                    v = ort_version_of(path)
                    ok = v == entry["source"]["version"]
                    print(f"verify {entry['name']}: {'ok' if ok else 'FAIL'} - dlopen, C API version {v}")
                    failures += not ok
                else:
                    print(f"verify {entry['name']}: ok - provider plugin, sha256 checked only")
                continue
            errs, info = check_model(entry, path)
        except Exception as e:  # report and carry on with the others
            errs, info = [f"{type(e).__name__}: {e}"], ""
        if errs:
            failures += 1
            print(f"verify {entry['name']}: FAIL")
            for e in errs:
                print(f"  {e}")
        else:
            print(f"verify {entry['name']}: ok - {info}")
    print(f"verify: {'all ok' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
