#!/usr/bin/env python3
"""Tiny, deterministic ONNX models for tests (generated, never downloaded).

    python3 testmodels.py NAME OUT.onnx [--check]

NAME:
  conv_sigmoid  input `input` float32 [N,3,H,W] (N, H, W dynamic)
                -> Conv(3->1, 3x3, stride 1, pad 1, fixed weights) -> Sigmoid
                -> output `output` float32 [N,1,H,W]
                weight[0,c,ky,kx] = ((c*9 + ky*3 + kx) - 13) / 27, bias = 0.1,
                so an all-zero input gives sigmoid(0.1) = 0.52497918 everywhere.

  swap_invert   inputs `target` float32 [1,3,128,128] (an aligned face, RGB in
                [0,1]) and `source` float32 [1,512] (an identity embedding)
                -> output `output` float32 [1,3,128,128]
                = clip(1 - target + mean(source), 0, 1): the signature of
                the common 128x128 face-swap models, with arithmetic a test
                can predict (the colour-inverted face, shifted by the mean of
                the embedding). Not a face-swap model.

The bytes are fixed (IR version, opset, names, no timestamps), so the sha256 in
models/manifest.toml stays valid for a given `onnx` version (pinned by
scripts/fetch-models). Needs `onnx` and `numpy`; `--check` also `onnxruntime`.
"""
from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def conv_sigmoid() -> onnx.ModelProto:
    w = ((np.arange(27, dtype=np.float32) - 13.0) / 27.0).reshape(1, 3, 3, 3)
    b = np.array([0.1], dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv_out"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Sigmoid", ["conv_out"], ["output"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "conv_sigmoid",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        initializer=[numpy_helper.from_array(w, "conv.weight"), numpy_helper.from_array(b, "conv.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="atelier-testmodels", producer_version="1")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def check_conv_sigmoid(data: bytes) -> str:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).standard_normal((2, 3, 17, 23)).astype(np.float32)
    y = sess.run(["output"], {"input": x})[0]
    assert y.shape == (2, 1, 17, 23) and y.dtype == np.float32, (y.shape, y.dtype)
    # reference: direct convolution in numpy
    w = ((np.arange(27, dtype=np.float32) - 13.0) / 27.0).reshape(3, 3, 3)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.full((2, 17, 23), 0.1, np.float32)
    for c in range(3):
        for ky in range(3):
            for kx in range(3):
                ref += w[c, ky, kx] * xp[:, c, ky:ky + 17, kx:kx + 23]
    ref = 1.0 / (1.0 + np.exp(-ref))
    err = float(np.abs(y[:, 0] - ref).max())
    assert err < 1e-5, err
    z = sess.run(["output"], {"input": np.zeros((1, 3, 4, 4), np.float32)})[0]
    assert np.allclose(z, 1.0 / (1.0 + np.exp(-0.1)), atol=1e-6)
    return f"onnxruntime {ort.__version__}: batch 2 x 3x17x23 -> {tuple(y.shape)}, max |err| vs numpy {err:.1e}"


def swap_invert() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Sub", ["one", "target"], ["inverted"], name="invert"),
        helper.make_node("ReduceMean", ["source"], ["mean"], name="mean", axes=[1], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape4"], ["mean4"], name="reshape"),
        helper.make_node("Add", ["inverted", "mean4"], ["shifted"], name="shift"),
        helper.make_node("Clip", ["shifted", "zero", "one"], ["output"], name="clip"),
    ]
    graph = helper.make_graph(
        nodes, "swap_invert",
        [helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
         helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                     numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "shape4")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="atelier-testmodels", producer_version="1")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def check_swap_invert(data: bytes) -> str:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    t = rng.random((1, 3, 128, 128), dtype=np.float32)
    e = rng.standard_normal((1, 512)).astype(np.float32) * 0.1
    y = sess.run(["output"], {"target": t, "source": e})[0]
    ref = np.clip(1.0 - t + e.mean(), 0.0, 1.0)
    err = float(np.abs(y - ref).max())
    assert y.shape == (1, 3, 128, 128) and err < 1e-6, (y.shape, err)
    return f"onnxruntime {ort.__version__}: 128x128 face + 512-d embedding, max |err| vs numpy {err:.1e}"


MODELS = {
    "conv_sigmoid": (conv_sigmoid, check_conv_sigmoid),
    "swap_invert": (swap_invert, check_swap_invert),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="generate a tiny test model")
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("out")
    ap.add_argument("--check", action="store_true", help="run it with onnxruntime against a numpy reference")
    args = ap.parse_args(argv)
    build, check = MODELS[args.name]
    data = build().SerializeToString(deterministic=True)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"testmodels: wrote {args.out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    if args.check:
        print(f"testmodels: {args.name} ok ({check(data)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
