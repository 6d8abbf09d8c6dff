"""ONNX Runtime sessions whose integer kernels are exact on every CPU.

On an x86 CPU without VNNI, MLAS multiplies uint8 activations by int8 weights
(QLinearConv, MatMulInteger, QLinearMatMul) with ``vpmaddubsw``, which saturates
each pair of products at int16: 255 * 127 * 2 = 64,770 reads 32,767
(onnxruntime#16105). qpipe's weights use the whole int8 range, so there a
pointwise conv of ReLU outputs is off by thousands of steps (measured on AMD EPYC
Zen 3: the demo QuartzNet's logits up to 7,605 steps off the reference's). MLAS's
uint8 x uint8 kernel widens to 16 bits first and is exact. So where a probe finds
the saturation, the session is given the same model with every int8 weight
shifted to uint8 (code + 128, zero point + 128): the same integers, exact on every
CPU. The file on disk keeps its int8 weights, which TensorRT asks for and which
VNNI CPUs run faster (on Zen 3 the shift made a 256x256 pointwise QLinearConv at
401 frames 1.33x slower; a depthwise one took the same time).

A model with int8 *activations* (the ``tensorrt`` layout) is left alone: ORT
runs int8 x int8 on its exact portable kernels.
"""
from __future__ import annotations

import functools
from typing import Any, Union

import numpy as np

# op -> (weight input, its zero-point input)
WEIGHT_SLOTS = {
    "DequantizeLinear": (0, 2),
    "QLinearConv": (3, 5),
    "QLinearMatMul": (3, 5),
    "ConvInteger": (1, 3),
    "MatMulInteger": (1, 3),
}


def _probe_models():
    """Two one-node models whose exact answer is 2 * 255 * 127: MatMulInteger (int32 out) and a pointwise
    QLinearConv (uint8 out, 250 exactly; 126 where the pair saturates)."""
    from onnx import TensorProto as TP, helper, numpy_helper as nh

    w = nh.from_array(np.full((2, 1), 127, np.int8), "w")
    mm = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe_mm",
                           [helper.make_tensor_value_info("a", TP.UINT8, [1, 2])],
                           [helper.make_tensor_value_info("y", TP.INT32, [1, 1])], initializer=[w])
    consts = [nh.from_array(np.array(1.0, np.float32), "sx"), nh.from_array(np.array(0, np.uint8), "zx"),
              nh.from_array(np.full((1, 2, 1), 127, np.int8), "wc"), nh.from_array(np.array(1.0, np.float32), "sw"),
              nh.from_array(np.array(0, np.int8), "zw"),
              nh.from_array(np.array(2 * 255 * 127 / 250, np.float32), "sy"), nh.from_array(np.array(0, np.uint8), "zy")]
    conv = helper.make_graph([helper.make_node("QLinearConv", ["x", "sx", "zx", "wc", "sw", "zw", "sy", "zy"], ["y"])],
                             "probe_conv", [helper.make_tensor_value_info("x", TP.UINT8, [1, 2, 1])],
                             [helper.make_tensor_value_info("y", TP.UINT8, [1, 1, 1])], initializer=consts)
    out = []
    for g, feed, want in ((mm, {"a": np.full((1, 2), 255, np.uint8)}, 2 * 255 * 127),
                          (conv, {"x": np.full((1, 2, 1), 255, np.uint8)}, 250)):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        out.append((m.SerializeToString(), feed, want))
    return out


@functools.lru_cache(maxsize=None)
def ort_u8s8_saturates() -> bool:
    """Whether this CPU's ORT computes uint8 x int8 products with int16 saturation (asked of ORT itself, once)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for blob, feed, want in _probe_models():
        sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        if int(sess.run(None, feed)[0].reshape(-1)[0]) != want:
            return True
    return False


def _has_int8_activations(graph) -> bool:
    from onnx import TensorProto as TP

    inits = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            if inits[n.input[2]].data_type == TP.INT8:
                return True
    return False


def shift_int8_weights(model) -> int:
    """Rewrite ``model`` (an onnx ModelProto, in place) so that every int8 weight initializer in a
    :data:`WEIGHT_SLOTS` slot is uint8 with its zero point moved by 128. Returns how many were shifted.
    A slot whose zero point is not a constant is left alone."""
    from onnx import TensorProto as TP, numpy_helper as nh

    g = model.graph
    if _has_int8_activations(g):
        return 0
    inits = {t.name: t for t in g.initializer}

    def add(name: str, make) -> str:
        """The initializer ``name``, made from ``make()`` the first time (a weight shared by two nodes is
        shifted once)."""
        if name not in inits:
            t = nh.from_array(make(), name)
            g.initializer.append(t)
            inits[name] = t
        return name

    shifted = 0
    for n in g.node:
        slot = WEIGHT_SLOTS.get(n.op_type)
        if slot is None or len(n.input) <= slot[0]:
            continue
        wi, zi = slot
        w = inits.get(n.input[wi])
        if w is None or w.data_type != TP.INT8:
            continue
        zname = n.input[zi] if len(n.input) > zi else ""
        if zname and zname not in inits:
            continue
        if zname:
            zp = nh.to_array(inits[zname]).astype(np.int16)
        elif n.op_type == "DequantizeLinear":  # per-axis scale: one zero point per channel
            scale = inits.get(n.input[1])
            if scale is None:
                continue
            zp = np.zeros(nh.to_array(scale).shape, np.int16)
        else:
            zp = np.zeros((), np.int16)
        wname = add(f"{w.name}__u8", lambda: (nh.to_array(w).astype(np.int16) + 128).astype(np.uint8))
        new_zp = add(f"{zname or n.name + '_w_zp'}__u8", lambda: (zp + 128).astype(np.uint8))
        ins = list(n.input) + [""] * (zi + 1 - len(n.input))
        ins[wi], ins[zi] = wname, new_zp
        del n.input[:]
        n.input.extend(ins)
        shifted += 1
    if shifted:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return shifted


def exact_model(path_or_bytes: Union[str, bytes], force: bool = False) -> Union[str, bytes]:
    """What to hand ``ort.InferenceSession``: the model as given where ORT computes it exactly on this CPU,
    else (or with ``force``) the bytes of its uint8-weight twin."""
    if not force and not ort_u8s8_saturates():
        return path_or_bytes
    import onnx

    model = onnx.load_from_string(path_or_bytes) if isinstance(path_or_bytes, bytes) else onnx.load(path_or_bytes)
    if not shift_int8_weights(model):
        return path_or_bytes
    return model.SerializeToString()


def exact_session(model: Any, opts: Any = None, force: bool = False):
    """``ort.InferenceSession`` (CPU) of ``model`` (a path, bytes or ModelProto), exact on this CPU."""
    import onnxruntime as ort

    if not isinstance(model, (str, bytes)):
        model = model.SerializeToString()
    return ort.InferenceSession(exact_model(model, force), sess_options=opts, providers=["CPUExecutionProvider"])
