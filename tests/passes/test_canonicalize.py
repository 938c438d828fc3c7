"""ReduceMean over spatial axes becomes GlobalAveragePool (so it runs as an int8 kernel)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from support import run

from onnxq.passes.prepare import prepare

CASES = {
    "axes input, keepdims": (
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 4, 5, 6] x) => (float[N, 4, 1, 1] y) <int64[2] axes = {2, 3}> {
            y = ReduceMean(x, axes)
        }""",
        "GlobalAveragePool",
    ),
    "axes attribute, no keepdims": (
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 4, 5, 6] x) => (float[N, 4] y) {
            y = ReduceMean <axes = [-1, -2], keepdims = 0> (x)
        }""",
        "Flatten",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spatial_mean_becomes_global_average_pool(case):
    text, last_op = CASES[case]
    model = onnx.parser.parse_model(text)
    prepared = ir.to_proto(prepare(ir.from_proto(model)))
    ops = [n.op_type for n in prepared.graph.node]
    assert "ReduceMean" not in ops and "GlobalAveragePool" in ops and ops[-1] == last_op
    assert [o.name for o in prepared.graph.output] == ["y"]
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(run(prepared, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5)


def test_channel_mean_is_left_alone():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 4, 5, 6] x) => (float[N, 1, 5, 6] y) { y = ReduceMean <axes = [1]> (x) }""")
    prepared = ir.to_proto(prepare(ir.from_proto(model)))
    assert [n.op_type for n in prepared.graph.node] == ["ReduceMean"]


RANK3 = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 6] x, float[4, 4, 1] w, float[6, 6] m) => (float[N, 4, 1] y) {{
        h = {producer}
        a = Relu(h)
        y = ReduceMean <axes = [2]> (a)
    }}"""


@pytest.mark.parametrize(
    "producer, pooled", [("Conv(x, w)", True), ("MatMul(x, m)", False)], ids=["conv1d", "matmul"]
)
def test_rank3_mean_pooled_only_after_a_channel_first_op(producer, pooled):
    """``N, C, L`` from a Conv1d is pooled; ``batch, sequence, width`` (a norm's mean) is not."""
    model = onnx.parser.parse_model(RANK3.format(producer=producer))
    ops = [n.op_type for n in ir.to_proto(prepare(ir.from_proto(model))).graph.node]
    assert ("GlobalAveragePool" in ops) == pooled and ("ReduceMean" in ops) != pooled
