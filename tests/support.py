"""Test support: small float models built in code, an SQNR oracle, ORT helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_cnn(rng: np.random.Generator, *, graph_output_is_conv: bool = False) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv+Relu -> Conv -> Add(residual)+Relu -> MaxPool -> Conv+Relu
    -> GlobalAveragePool -> Flatten -> Gemm(transB=1) -> y[N,10]."""

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        init("w1", 8, 3, 3, 3),
        init("b1", 8, scale=0.1),
        init("w2", 8, 8, 3, 3, scale=0.15),
        init("b2", 8, scale=0.1),
        init("w3", 16, 8, 3, 3, scale=0.15),
        init("b3", 16, scale=0.1),
        init("wf", 10, 16),
        init("bf", 10, scale=0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s2"], name="add2"),
        helper.make_node("Relu", ["s2"], ["r2"], name="relu2"),
        helper.make_node(
            "MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])]
    if graph_output_is_conv:
        nodes[-1].output[0] = "y"
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])]
        inits = inits[:-2]
    else:
        nodes += [
            helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
            helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
        ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """``20 log10(|x| / |x - y|)``."""
    return float(20 * np.log10(np.linalg.norm(reference) / np.linalg.norm(reference - approx)))


def run(
    model: onnx.ModelProto | Path, feed: dict[str, np.ndarray], *, fused: bool = True
) -> list[np.ndarray]:
    """Run a model on ONNX Runtime's CPU provider with default optimisations, or, with
    ``fused=False``, none: Q/DQ then run as float arithmetic (fake quantization), the same on
    every CPU, which is what an int8 kernel without saturation computes."""
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def optimized_op_counts(model: onnx.ModelProto, tmp_path: Path) -> dict[str, int]:
    """Op types of the graph ONNX Runtime really runs (after its CPU graph optimisation)."""
    from collections import Counter

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))


def small_cnn(*, convs: int = 2, classes: int = 5, seed: int = 0) -> onnx.ModelProto:
    """``convs`` x (Conv-Relu), GlobalAveragePool, Flatten, MatMul on ``[N, 3, 8, 8]`` images."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, channels = [], [], "x", 3
    for i in range(convs):
        weight = (0.3 * rng.normal(size=(8, channels, 3, 3))).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, channels = f"r{i}", 8
    head = (0.3 * rng.normal(size=(8, classes))).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "wf"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "wf"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cpuid_masked_env(profile: str) -> dict[str, str]:
    """The environment of a process that sees ``profile``'s CPU (``benchmarks.cpu_mask``);
    skips where this machine cannot mask CPUID or this process already runs masked."""
    from benchmarks.cpu_mask import MaskUnavailable, active_profile, masked_env

    if active_profile() is not None:
        pytest.skip("this process already runs under a CPUID mask")
    try:
        return masked_env(profile)
    except MaskUnavailable as error:
        pytest.skip(str(error))
