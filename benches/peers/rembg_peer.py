"""The Python side of `cargo bench -p atelier-worker --bench pipeline`.

Run by scripts/bench-rembg in a cached venv (rembg and onnxruntime from
PyPI, onnxruntime at the version of the library the worker loads). On the
same model file, the same photo and the same thread count as the worker's
bench, it measures:

  * raw inference of the model at 1024² in Python's onnxruntime, with the
    session options rembg uses (ORT_ENABLE_ALL, intra-op threads as given);
  * rembg's whole `remove()` with a white background (decode, ISNet,
    mask resize, cut-out, composite), through rembg's own `dis_custom`
    session so nothing is downloaded.

`--only raw` or `--only remove` measures one of the two (the worker's bench
runs the raw one right after its own raw runs, so both see the same
machine). Prints one JSON line: {"raw_median_s", "raw_min_s",
"remove_median_s", "remove_images_per_s", "onnxruntime", "rembg"}, the
keys of what was measured.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from PIL import Image


def options(threads: int) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    return o


def timed(f, runs: int) -> list:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--photo", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", choices=["raw", "remove", "both"], default="both")
    a = p.parse_args()
    out = {"onnxruntime": ort.__version__}

    if a.only in ("raw", "both"):
        s = ort.InferenceSession(a.model, options(a.threads), providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        x = np.full((1, 3, 1024, 1024), 0.1, dtype=np.float32)
        s.run(None, {name: x})  # warm-up, as the worker's bench loads and warms
        raw = timed(lambda: s.run(None, {name: x}), a.runs)
        del s
        out.update(raw_median_s=statistics.median(raw), raw_min_s=min(raw))
    if a.only == "raw":
        print(json.dumps(out))
        return

    # rembg only opens custom models inside its models directory.
    os.environ["U2NET_HOME"] = os.path.dirname(os.path.abspath(a.model))
    import rembg  # after the raw figure: importing it loads more than onnxruntime

    session = rembg.new_session("dis_custom", options(a.threads), model_path=os.path.abspath(a.model))
    photo = Image.open(a.photo)
    photo.load()
    rembg.remove(photo, session=session, bgcolor=(255, 255, 255, 255))
    rm = timed(lambda: rembg.remove(photo, session=session, bgcolor=(255, 255, 255, 255)), a.runs)

    out.update(
        remove_median_s=statistics.median(rm),
        remove_images_per_s=1.0 / statistics.median(rm),
        rembg=getattr(rembg, "__version__", "?"),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
