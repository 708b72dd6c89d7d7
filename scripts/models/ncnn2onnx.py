#!/usr/bin/env python3
"""Convert an ncnn model (.param text + .bin weights) into an ONNX graph.

Written for Real-ESRGAN's `realesr-animevideov3-x{2,3,4}` (and it also handles
`realesrgan-x4plus-anime`), so it covers the layers those use and a few close
relatives; anything else is refused with an error rather than guessed at:

    Input, Split, Convolution, ConvolutionDepthWise, PReLU, ReLU, Sigmoid,
    PixelShuffle, Interp (nearest / bilinear), BinaryOp, Eltwise, Concat

The output is deterministic (fixed IR version, opset, names and metadata; no
paths or timestamps), so its sha256 can be pinned in models/manifest.toml.

    python3 ncnn2onnx.py model.param model.bin out.onnx [--input-name input]
        [--output-name output] [--check]

Needs the `onnx` and `numpy` packages (scripts/fetch-models provides them).
ncnn formats: https://github.com/Tencent/ncnn/wiki/param-and-model-file-structure
"""
from __future__ import annotations

import argparse
import hashlib
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17
PRODUCER = "atelier-ncnn2onnx"
PRODUCER_VERSION = "1"

# tags at the start of a "type 0" weight blob (ncnn ModelBinFromDataReader::load)
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32_RAW = 0x0002C056


class ConvertError(Exception):
    pass


@dataclass
class Layer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, object] = field(default_factory=dict)

    def get(self, key: int, default=None):
        return self.params.get(key, default)


def _num(text: str):
    if any(ch in text for ch in ".eE") and not text.lstrip("-").isdigit():
        return float(text)
    return int(text)


def parse_param(text: str) -> list[Layer]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != "7767517":
        raise ConvertError("not an ncnn .param file (magic 7767517 missing)")
    layer_count, _blob_count = (int(v) for v in lines[1].split())
    layers: list[Layer] = []
    for ln in lines[2:]:
        tok = ln.split()
        ltype, name, nb, nt = tok[0], tok[1], int(tok[2]), int(tok[3])
        bottoms = tok[4 : 4 + nb]
        tops = tok[4 + nb : 4 + nb + nt]
        params: dict[int, object] = {}
        for kv in tok[4 + nb + nt :]:
            k, v = kv.split("=", 1)
            key = int(k)
            if key <= -23300:  # array parameter: -23300-id=count,v1,v2,...
                key = -key - 23300
                parts = v.split(",")
                count = int(parts[0])
                vals = [_num(p) for p in parts[1:]]
                if len(vals) != count:
                    raise ConvertError(f"{name}: array param {key} says {count} values, has {len(vals)}")
                params[key] = vals
            else:
                params[key] = _num(v)
        layers.append(Layer(ltype, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise ConvertError(f".param header says {layer_count} layers, found {len(layers)}")
    return layers


class WeightReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ConvertError(f".bin too short: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    @staticmethod
    def _align4(n: int) -> int:
        return (n + 3) & ~3

    def load(self, count: int, typ: int) -> np.ndarray:
        """ncnn ModelBin::load(w, type): type 1 = raw fp32, type 0 = tagged."""
        if typ == 1:
            return np.frombuffer(self._take(count * 4), dtype="<f4").astype(np.float32)
        tag_bytes = self._take(4)
        tag = struct.unpack("<I", tag_bytes)[0]
        if tag == TAG_FP16:
            raw = self._take(self._align4(count * 2))
            return np.frombuffer(raw[: count * 2], dtype="<f2").astype(np.float32)
        if tag == TAG_INT8:
            raise ConvertError("int8-quantised ncnn weights are not supported")
        if tag == TAG_FP32_RAW or tag == 0:
            return np.frombuffer(self._take(count * 4), dtype="<f4").astype(np.float32)
        # any other non-zero flag: 256-entry float table + uint8 indices
        table = np.frombuffer(self._take(256 * 4), dtype="<f4")
        idx = np.frombuffer(self._take(self._align4(count))[:count], dtype=np.uint8)
        return table[idx].astype(np.float32)


class Converter:
    def __init__(self, layers: list[Layer], weights: bytes, input_name: str, output_name: str):
        self.layers = layers
        self.wr = WeightReader(weights)
        self.input_name = input_name
        self.output_name = output_name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.alias: dict[str, str] = {}  # ncnn blob -> onnx tensor name
        self.in_channels: int | None = None
        self.graph_input_blob: str | None = None

    # -- helpers -------------------------------------------------------
    def t(self, blob: str) -> str:
        return self.alias.get(blob, blob)

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def activation(self, L: Layer, src: str, dst: str):
        act = L.get(9, 0)
        ap = L.get(10, [])
        if act == 0:
            self.alias[dst] = src
        elif act == 1:
            self.node("Relu", [src], [dst], L.name + "_relu")
        elif act == 2:
            self.node("LeakyRelu", [src], [dst], L.name + "_leaky", alpha=float(ap[0]))
        elif act == 3:
            lo = self.init(L.name + ".clip_min", np.array(ap[0], np.float32))
            hi = self.init(L.name + ".clip_max", np.array(ap[1], np.float32))
            self.node("Clip", [src, lo, hi], [dst], L.name + "_clip")
        elif act == 4:
            self.node("Sigmoid", [src], [dst], L.name + "_sigmoid")
        else:
            raise ConvertError(f"{L.name}: fused activation type {act} not supported")

    # -- layers --------------------------------------------------------
    def conv(self, L: Layer, depthwise: bool):
        if L.get(8, 0):
            raise ConvertError(f"{L.name}: int8 convolution not supported")
        if float(L.get(18, 0.0)) != 0.0:
            raise ConvertError(f"{L.name}: non-zero pad_value not supported")
        outc = int(L.get(0))
        kw = int(L.get(1, 0)); kh = int(L.get(11, kw))
        dw = int(L.get(2, 1)); dh = int(L.get(12, dw))
        sw = int(L.get(3, 1)); sh = int(L.get(13, sw))
        pl = int(L.get(4, 0)); pr = int(L.get(15, pl)); pt = int(L.get(14, pl)); pb = int(L.get(16, pt))
        bias_term = int(L.get(5, 0))
        wsize = int(L.get(6))
        group = int(L.get(7, 1)) if depthwise else 1
        per_group_in = wsize // (outc * kh * kw)
        if per_group_in * outc * kh * kw != wsize:
            raise ConvertError(f"{L.name}: weight_data_size {wsize} not divisible by {outc}x{kh}x{kw}")
        inc = per_group_in * group
        if self.in_channels is None and self.t(L.bottoms[0]) == self.input_name:
            self.in_channels = inc
        w = self.wr.load(wsize, 0).reshape(outc, per_group_in, kh, kw)
        ins = [self.t(L.bottoms[0]), self.init(L.name + ".weight", w)]
        if bias_term:
            ins.append(self.init(L.name + ".bias", self.wr.load(outc, 1)))
        attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw], group=group)
        if pl == -233:
            attrs["auto_pad"] = "SAME_UPPER"
        elif pl == -234:
            attrs["auto_pad"] = "SAME_LOWER"
        elif min(pl, pr, pt, pb) < 0:
            raise ConvertError(f"{L.name}: padding mode {pl} not supported")
        else:
            attrs["pads"] = [pt, pl, pb, pr]
        raw = L.tops[0] + "__conv" if L.get(9, 0) else L.tops[0]
        self.node("Conv", ins, [raw], L.name, **attrs)
        if L.get(9, 0):
            self.activation(L, raw, L.tops[0])

    def prelu(self, L: Layer):
        n = int(L.get(0, 0))
        slope = self.wr.load(n, 1)
        slope = slope.reshape(1) if n == 1 else slope.reshape(n, 1, 1)
        self.node("PRelu", [self.t(L.bottoms[0]), self.init(L.name + ".slope", slope)], [L.tops[0]], L.name)

    def relu(self, L: Layer):
        slope = float(L.get(0, 0.0))
        if slope == 0.0:
            self.node("Relu", [self.t(L.bottoms[0])], [L.tops[0]], L.name)
        else:
            self.node("LeakyRelu", [self.t(L.bottoms[0])], [L.tops[0]], L.name, alpha=slope)

    def pixelshuffle(self, L: Layer):
        r = int(L.get(0, 1))
        mode = int(L.get(1, 0))  # 0: PyTorch pixel_shuffle (CRD), 1: TensorFlow (DCR)
        self.node("DepthToSpace", [self.t(L.bottoms[0])], [L.tops[0]], L.name,
                  blocksize=r, mode="CRD" if mode == 0 else "DCR")

    def interp(self, L: Layer):
        rtype = int(L.get(0, 0))
        hs = float(L.get(1, 1.0)); ws = float(L.get(2, 1.0))
        oh = int(L.get(3, 0)); ow = int(L.get(4, 0))
        if int(L.get(5, 0)):
            raise ConvertError(f"{L.name}: dynamic target size not supported")
        align = int(L.get(6, 0))
        if rtype == 1:
            attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif rtype == 2:
            attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if align else "half_pixel")
        else:
            raise ConvertError(f"{L.name}: Interp resize_type {rtype} not supported")
        x = self.t(L.bottoms[0])
        if oh and ow:
            raise ConvertError(f"{L.name}: fixed output size ({oh}x{ow}) Interp not supported")
        scales = self.init(L.name + ".scales", np.array([1.0, 1.0, hs, ws], np.float32))
        self.node("Resize", [x, "", scales], [L.tops[0]], L.name, **attrs)

    def binaryop(self, L: Layer):
        op = int(L.get(0, 0))
        names = {0: "Add", 1: "Sub", 2: "Mul", 3: "Div", 4: "Max", 5: "Min", 6: "Pow"}
        reverse = {7: "Sub", 8: "Div"}
        if op not in names and op not in reverse:
            raise ConvertError(f"{L.name}: BinaryOp op_type {op} not supported")
        if int(L.get(1, 0)):
            a = self.t(L.bottoms[0])
            b = self.init(L.name + ".b", np.array(float(L.get(2, 0.0)), np.float32))
        else:
            a, b = self.t(L.bottoms[0]), self.t(L.bottoms[1])
        if op in reverse:
            a, b = b, a
        self.node(names.get(op) or reverse[op], [a, b], [L.tops[0]], L.name)

    def eltwise(self, L: Layer):
        op = int(L.get(0, 0))
        coeffs = L.get(1, [])
        ins = [self.t(b) for b in L.bottoms]
        if op == 1 and coeffs and any(float(c) != 1.0 for c in coeffs):
            scaled = []
            for i, (x, c) in enumerate(zip(ins, coeffs)):
                cn = self.init(f"{L.name}.coeff{i}", np.array(float(c), np.float32))
                out = f"{L.tops[0]}__scaled{i}"
                self.node("Mul", [x, cn], [out], f"{L.name}_mul{i}")
                scaled.append(out)
            ins = scaled
        opname = {0: "Mul", 1: "Sum", 2: "Max"}.get(op)
        if opname is None:
            raise ConvertError(f"{L.name}: Eltwise op_type {op} not supported")
        if opname == "Sum":
            self.node("Sum", ins, [L.tops[0]], L.name)
        elif opname == "Max":
            self.node("Max", ins, [L.tops[0]], L.name)
        else:  # product of n inputs
            acc = ins[0]
            for i, x in enumerate(ins[1:]):
                out = L.tops[0] if i == len(ins) - 2 else f"{L.tops[0]}__prod{i}"
                self.node("Mul", [acc, x], [out], f"{L.name}_{i}")
                acc = out

    def concat(self, L: Layer):
        axis = int(L.get(0, 0))
        self.node("Concat", [self.t(b) for b in L.bottoms], [L.tops[0]], L.name,
                  axis=axis + 1 if axis >= 0 else axis)

    # -- driver --------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        consumed: set[str] = set()
        produced: list[str] = []
        for L in self.layers:
            consumed.update(L.bottoms)
            if L.type == "Input":
                if self.graph_input_blob is not None:
                    raise ConvertError("more than one Input layer")
                self.graph_input_blob = L.tops[0]
                self.alias[L.tops[0]] = self.input_name
                if L.get(2):
                    self.in_channels = int(L.get(2))
                continue
            if L.type == "Split":
                for top in L.tops:
                    self.alias[top] = self.t(L.bottoms[0])
                continue
            handler = {
                "Convolution": lambda L: self.conv(L, False),
                "ConvolutionDepthWise": lambda L: self.conv(L, True),
                "PReLU": self.prelu,
                "ReLU": self.relu,
                "Sigmoid": lambda L: self.node("Sigmoid", [self.t(L.bottoms[0])], [L.tops[0]], L.name),
                "PixelShuffle": self.pixelshuffle,
                "Interp": self.interp,
                "BinaryOp": self.binaryop,
                "Eltwise": self.eltwise,
                "Concat": self.concat,
            }.get(L.type)
            if handler is None:
                raise ConvertError(f"layer type {L.type} ({L.name}) not supported")
            handler(L)
            produced.extend(L.tops)

        if self.wr.pos != len(self.wr.data):
            raise ConvertError(f"weights not fully consumed: used {self.wr.pos} of {len(self.wr.data)} bytes")
        if self.graph_input_blob is None:
            raise ConvertError("no Input layer")
        outputs = [b for b in produced if b not in consumed]
        if len(outputs) != 1:
            raise ConvertError(f"expected exactly one graph output, found {outputs}")
        # rename the final tensor to the requested output name
        final = outputs[0]
        for n in self.nodes:
            for i, o in enumerate(n.output):
                if o == final:
                    n.output[i] = self.output_name
        if self.in_channels is None:
            raise ConvertError("could not determine the number of input channels")

        x = helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, ["N", self.in_channels, "H", "W"])
        y = helper.make_tensor_value_info(self.output_name, TensorProto.FLOAT, ["N", None, "H_out", "W_out"])
        graph = helper.make_graph(self.nodes, "ncnn2onnx", [x], [y], initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name=PRODUCER, producer_version=PRODUCER_VERSION)
        model.ir_version = IR_VERSION
        # fill the output channel count from shape inference
        inferred = onnx.shape_inference.infer_shapes(model)
        out_t = inferred.graph.output[0].type.tensor_type
        c_dim = out_t.shape.dim[1] if len(out_t.shape.dim) == 4 else None
        if c_dim is not None and c_dim.HasField("dim_value"):
            model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = c_dim.dim_value
        return model


def convert(param_text: str, weights: bytes, input_name="input", output_name="output") -> onnx.ModelProto:
    conv = Converter(parse_param(param_text), weights, input_name, output_name)
    model = conv.run()
    for key, val in (
        ("ncnn_param_sha256", hashlib.sha256(param_text.encode()).hexdigest()),
        ("ncnn_bin_sha256", hashlib.sha256(weights).hexdigest()),
    ):
        p = model.metadata_props.add()
        p.key, p.value = key, val
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("param")
    ap.add_argument("bin")
    ap.add_argument("out")
    ap.add_argument("--input-name", default="input")
    ap.add_argument("--output-name", default="output")
    ap.add_argument("--check", action="store_true",
                    help="run the converted model on a random 1x3x32x48 image with onnxruntime")
    args = ap.parse_args(argv)
    with open(args.param, encoding="utf-8") as f:
        param_text = f.read()
    with open(args.bin, "rb") as f:
        weights = f.read()
    try:
        model = convert(param_text, weights, args.input_name, args.output_name)
    except ConvertError as e:
        print(f"ncnn2onnx: {e}", file=sys.stderr)
        return 1
    data = model.SerializeToString(deterministic=True)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"ncnn2onnx: wrote {args.out} ({len(data)} bytes, {len(model.graph.node)} nodes, "
          f"{len(model.graph.initializer)} initializers, sha256 {hashlib.sha256(data).hexdigest()})")
    if args.check:
        import onnxruntime as ort
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, int(model.graph.input[0].type.tensor_type.shape.dim[1].dim_value), 32, 48), dtype=np.float32)
        y = sess.run(None, {args.input_name: x})[0]
        print(f"ncnn2onnx: check {x.shape} -> {y.shape}, finite={bool(np.isfinite(y).all())}, "
              f"min={y.min():.4f} max={y.max():.4f} mean={y.mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
