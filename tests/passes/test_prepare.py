"""Prepare passes: folded graphs stay numerically equal to the original under ONNX Runtime."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxq.errors import ConfigError, UnsupportedModelError
from onnxq.passes.fold_batchnorm import fold_batchnorm
from onnxq.passes.fold_constants import fold_constants
from onnxq.passes.opset import check_domains, upgrade_opset
from onnxq.passes.prepare import infer_shapes, prepare

# Max abs error allowed, relative to the largest output magnitude (float32 has ~6e-8 epsilon).
REL_TOL = 1e-5


def _model(text: str, seed: int = 0, **initializers: np.ndarray | tuple[int, ...]) -> ir.Model:
    """Parse ONNX text and attach initializers: arrays as given, shapes as random float32."""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, value in initializers.items():
        array = value if isinstance(value, np.ndarray) else rng.standard_normal(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _random_feeds(model: ir.Model, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = tuple(int(d) for d in value.shape)
        dtype = value.dtype.numpy()
        if dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _prepare_and_compare(model: ir.Model, feeds: dict[str, np.ndarray] | None = None, **kwargs):
    """Prepare a model, check it with the full ONNX checker, compare outputs with the original."""
    feeds = feeds if feeds is not None else _random_feeds(model)
    expected = _run(model, feeds)
    prepared = prepare(model, **kwargs)
    onnx.checker.check_model(ir.to_proto(prepared), full_check=True)
    actual = _run(prepared, feeds)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = max(float(np.abs(want).max()), 1.0)
        assert float(np.abs(got - want).max()) <= REL_TOL * scale
    return prepared


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)]


def _bn_params(channels: int, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": (rng.random(channels) + 0.5).astype(np.float32),
        "beta": rng.standard_normal(channels).astype(np.float32),
        "mean": rng.standard_normal(channels).astype(np.float32),
        "var": (rng.random(channels) + 0.1).astype(np.float32),
    }


CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4,9,9] x) => (float[2,6,{out},{out}] y) {{
  c = {op} <{attrs}> ({inputs})
  y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
}}
"""


@pytest.mark.parametrize(
    ("op", "attrs", "bias", "weight", "out"),
    [
        ("Conv", "pads = [1, 1, 1, 1]", True, (6, 4, 3, 3), 9),
        ("Conv", "pads = [1, 1, 1, 1]", False, (6, 4, 3, 3), 9),
        ("Conv", "group = 2, strides = [2, 2]", True, (6, 2, 3, 3), 4),
        ("ConvTranspose", "strides = [2, 2]", True, (4, 6, 3, 3), 19),
        ("ConvTranspose", "group = 2", False, (4, 3, 3, 3), 11),
    ],
    ids=[
        "conv-bias",
        "conv-nobias",
        "grouped-conv",
        "convtranspose",
        "grouped-convtranspose-nobias",
    ],
)
def test_batchnorm_folds_into_conv(op, attrs, bias, weight, out):
    inputs = "x, W, B" if bias else "x, W"
    text = CONV_BN.format(op=op, attrs=attrs, inputs=inputs, out=out)
    extra = {"B": (6,)} if bias else {}
    model = _model(text, W=weight, **extra, **_bn_params(6))
    prepared = _prepare_and_compare(model)
    assert "BatchNormalization" not in _ops(prepared)
    assert _ops(prepared).count(op) == 1
    conv = next(node for node in prepared.graph if node.op_type == op)
    assert conv.outputs[0].name == "y"  # the BN output's name lives on
    assert all(value is not None and value.is_initializer() for value in conv.inputs[1:])
    assert len(conv.inputs) == 3
    assert set(prepared.graph.initializers) == {value.name for value in conv.inputs[1:]}


def test_batchnorm_fold_matches_numpy_formula():
    params = _bn_params(6)
    text = CONV_BN.format(op="Conv", attrs="group = 1", inputs="x, W, B", out=7)
    model = _model(text, W=(6, 4, 3, 3), B=(6,), **params)
    w = model.graph.initializers["W"].const_value.numpy().astype(np.float64)
    b = model.graph.initializers["B"].const_value.numpy().astype(np.float64)
    fold_batchnorm(model)
    conv = model.graph[0]
    s = params["gamma"] / np.sqrt(params["var"].astype(np.float64) + np.float32(1e-3))
    np.testing.assert_array_equal(
        conv.inputs[1].const_value.numpy(), (w * s[:, None, None, None]).astype(np.float32)
    )
    np.testing.assert_array_equal(
        conv.inputs[2].const_value.numpy(),
        ((b - params["mean"]) * s + params["beta"]).astype(np.float32),
    )


def test_initializers_listed_as_inputs_become_weights():
    text = CONV_BN.format(op="Conv", attrs="group = 1", inputs="x, W, B", out=7)
    proto = ir.to_proto(_model(text, W=(6, 4, 3, 3), B=(6,), **_bn_params(6)))
    # Old exporters (IR version 3) list every initializer among the graph inputs too.
    proto.graph.input.extend(
        onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims)
        for init in proto.graph.initializer
    )
    model = ir.from_proto(proto)
    prepared = _prepare_and_compare(model)
    assert [value.name for value in prepared.graph.inputs] == ["x"]
    assert _ops(prepared) == ["Conv"]


def test_batchnorm_left_alone_when_conv_output_is_shared():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,5,5] x) => (float[1,6,5,5] y, float[1,6,5,5] c) {
      c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
      y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    model = _model(text, W=(6, 4, 3, 3), B=(6,), **_bn_params(6))
    prepared = _prepare_and_compare(model)
    assert _ops(prepared) == ["Conv", "BatchNormalization"]


def test_batchnorm_left_alone_after_non_conv():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,6,5,5] x) => (float[1,6,5,5] y) {
      r = Relu (x)
      y = BatchNormalization (r, gamma, beta, mean, var)
    }
    """
    prepared = _prepare_and_compare(_model(text, **_bn_params(6)))
    assert _ops(prepared) == ["Relu", "BatchNormalization"]


def test_constant_of_shape_weight_becomes_initializer():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,6,6] x) => (float[1,6,6,6] y) {
      shape = Constant <value_ints = [6, 4, 3, 3]> ()
      ones = ConstantOfShape <value = float[1] {0.5}> (shape)
      w = Mul (ones, W0)
      y = Conv <pads = [1, 1, 1, 1]> (x, w)
    }
    """
    prepared = _prepare_and_compare(_model(text, W0=(6, 4, 3, 3)))
    assert _ops(prepared) == ["Conv"]
    weight = prepared.graph[0].inputs[1]
    assert weight.is_initializer() and weight.producer() is None
    assert weight.const_value.shape == (6, 4, 3, 3)
    assert list(prepared.graph.initializers) == [weight.name]


def test_transposed_weight_becomes_initializer():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,8] x) => (float[3,5] y) {
      wt = Transpose <perm = [1, 0]> (W)
      y = MatMul (x, wt)
    }
    """
    model = _model(text, W=(5, 8))
    prepared = _prepare_and_compare(model)
    assert _ops(prepared) == ["MatMul"]
    w = model.graph.initializers["W"].const_value.numpy()
    np.testing.assert_array_equal(prepared.graph[0].inputs[1].const_value.numpy(), w.T)


def test_shape_of_static_tensor_folds_into_reshape_target():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3,4] x) => (float[2,12] y) {
      r = Relu (x)
      s = Shape (r)
      n = Gather <axis = 0> (s, zero)
      n1 = Unsqueeze (n, axes)
      target = Concat <axis = 0> (n1, minus_one)
      t = Cast <to = 1> (target)
      back = Cast <to = 7> (t)
      y = Reshape (r, back)
    }
    """
    model = _model(
        text,
        zero=np.array(0, np.int64),
        axes=np.array([0], np.int64),
        minus_one=np.array([-1], np.int64),
    )
    prepared = _prepare_and_compare(model)
    assert _ops(prepared) == ["Relu", "Reshape"]
    target = prepared.graph[1].inputs[1].const_value.numpy()
    np.testing.assert_array_equal(target, [2, -1])


def test_shape_of_dynamic_tensor_is_kept():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3] x) => (float[N,3] y) {
      s = Shape (x)
      y = Reshape (x, s)
    }
    """
    model = _model(text)
    prepared = _prepare_and_compare(model, {"x": np.ones((5, 3), np.float32)})
    assert _ops(prepared) == ["Shape", "Reshape"]


def test_fold_constants_declines_big_random_and_overridable_values():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x, float[4] k) => (float[4] y, float[1000] big, float[4] noise) {
      kk = Mul (k, k)
      n = Constant <value_ints = [1000]> ()
      big = ConstantOfShape <value = float[1] {1.0}> (n)
      noise = RandomUniform <shape = [4], seed = 1.0> ()
      c2 = ConstantOfShape <value = float[1] {2.0}> (n)
      c = Slice (c2, starts, ends)
      y0 = Add (x, kk)
      y = Add (y0, c)
    }
    """
    proto = onnx.parser.parse_model(text)
    # ``k`` is an initializer that is also a graph input: a default the caller may override.
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "k"))
    for name, array in {"starts": [0], "ends": [4]}.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.array(array, np.int64), name))
    model = fold_constants(ir.from_proto(proto), max_size=100)
    ops = _ops(model)
    assert "Mul" in ops  # depends on the overridable ``k``
    assert "RandomUniform" in ops
    assert "ConstantOfShape" in ops  # ``big`` is a graph output, ``c2`` exceeds max_size
    assert ops.count("ConstantOfShape") == 2
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_fold_constants_rejects_bad_max_size():
    with pytest.raises(ConfigError, match="max_size"):
        fold_constants(
            _model(
                CONV_BN.format(op="Conv", attrs="group = 1", inputs="x, W", out=7),
                W=(6, 4, 3, 3),
                **_bn_params(6),
            ),
            max_size=0,
        )


OPSET11 = """
<ir_version: 6, opset_import: ["" : 11]>
g (float[2,6,5,5] x) => (float[2,64] y, float[2,2,5,5] z) {
  a, b = Split <axis = 1, split = [2, 4]> (x)
  s = ReduceSum <axes = [1], keepdims = 0> (b)
  u = Unsqueeze <axes = [1]> (s)
  q = Squeeze <axes = [1]> (u)
  r = ReduceMean <axes = [2], keepdims = 0> (q)
  y = MatMul (r, M)
  c = Conv <pads = [1, 1, 1, 1]> (a, W, B)
  z = BatchNormalization (c, gamma, beta, mean, var)
}
"""


def test_opset11_model_is_upgraded_and_equal():
    # ``M`` (1280 bytes) travels beside the version converter, the small tensors through it.
    model = _model(OPSET11, W=(2, 2, 3, 3), B=(2,), M=(5, 64), **_bn_params(2))
    prepared = _prepare_and_compare(model)
    assert prepared.opset_imports[""] >= 13
    assert "BatchNormalization" not in _ops(prepared)
    assert prepared.graph.initializers["M"].const_value is model.graph.initializers["M"].const_value
    assert model.opset_imports[""] == 11  # the input model is not modified


def test_opset11_local_function_is_inlined_on_upgrade():
    proto = onnx.parser.parse_model("""
    <ir_version: 7, opset_import: ["" : 11, "my.funcs" : 1]>
    g (float[2,3] x) => (float[2,3] y) {
      y = my.funcs.Squash (x)
    }
    <domain: "my.funcs", opset_import: ["" : 11]>
    Squash (a) => (b) {
      u = Unsqueeze <axes = [0]> (a)
      s = ReduceSum <axes = [0], keepdims = 0> (u)
      b = Add (s, a)
    }
    """)
    # The converter leaves function bodies alone; ORT would read them at the new opset.
    prepared = _prepare_and_compare(ir.from_proto(proto))
    assert not prepared.functions
    assert _ops(prepared) == ["Unsqueeze", "ReduceSum", "Add"]


def test_upgrade_opset_never_lowers_and_validates():
    text = CONV_BN.format(op="Conv", attrs="group = 1", inputs="x, W", out=7)
    model = _model(text, W=(6, 4, 3, 3), **_bn_params(6))
    assert upgrade_opset(model, min_opset=13).opset_imports[""] == 17
    with pytest.raises(ConfigError, match="min_opset"):
        upgrade_opset(model, min_opset=10_000)


def test_upgrade_opset_failure_is_unsupported_model():
    proto = onnx.parser.parse_model("""
    <ir_version: 6, opset_import: ["" : 9]>
    g (float[2] x) => (float[2] y) {
      y = NotAnOnnxOp (x)
    }
    """)
    with pytest.raises(UnsupportedModelError, match="cannot upgrade the model from opset 9 to 13"):
        upgrade_opset(ir.from_proto(proto), min_opset=13)


def test_upgrade_that_changes_the_interface_is_refused():
    """Scan-8 takes batched inputs; the converter's Scan-9 drops the batch axis from the graph's
    own inputs, so the upgraded model would not take the model's data."""
    body = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["s_in", "v"], ["s_out"])],
        "body",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("s_in", "v")],
        [onnx.helper.make_tensor_value_info("s_out", onnx.TensorProto.FLOAT, [2])],
    )
    scan = onnx.helper.make_node("Scan", ["", "init", "x"], ["y"], body=body, num_scan_inputs=1)
    graph = onnx.helper.make_graph(
        [scan],
        "g",
        [
            onnx.helper.make_tensor_value_info("init", onnx.TensorProto.FLOAT, [1, 2]),
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 8)])
    with pytest.raises(UnsupportedModelError, match="changes 'init' from float32") as refusal:
        upgrade_opset(ir.from_proto(proto), min_opset=13)
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_opset6_prelu_slopes_keep_broadcasting_over_channels(rank):
    """Below opset 7 a [C] slope applies per channel (axis 1); from 7 on, to the last axis."""
    shape = (2, 3, 4, 5)[:rank]
    slope = np.array([0.1, -0.5, 2.0], np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("PRelu", ["x", "slope"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(slope, "slope")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 6)])
    upgraded = upgrade_opset(ir.from_proto(proto), min_opset=13)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    channel_slope = slope.reshape((3,) + (1,) * (rank - 2))
    np.testing.assert_allclose(_run(upgraded, {"x": x})[0], np.where(x < 0, x * channel_slope, x))


IF_LOOP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, bool cond) => (float[2,3] y, float[2,3] z) {
  k = Constant <value = float[1] {2.0}> ()
  kk = Mul (k, k)
  y = If (cond) <
    then_branch = then_g () => (float[2,3] t) {
      c = Constant <value = float[1] {3.0}> ()
      c2 = Add (c, kk)
      t = Mul (x, c2)
    },
    else_branch = else_g () => (float[2,3] e) {
      e = Sub (x, kk)
    }
  >
  trip = Constant <value = int64 {3}> ()
  keep_going = Constant <value = bool {1}> ()
  z = Loop (trip, keep_going, x) <
    body = body_g (int64 i, bool cond_in, float[2,3] acc) => (bool cond_out, float[2,3] acc2) {
      cond_out = Identity (cond_in)
      half = Constant <value = float[1] {0.5}> ()
      step = Mul (half, kk)
      w = Transpose <perm = [1, 0]> (W)
      wx = MatMul (acc, w)
      acc2 = Add (wx, step)
    }
  >
}
"""


@pytest.mark.parametrize("cond", [True, False])
def test_if_and_loop_models_survive(cond):
    model = _model(IF_LOOP, W=(3, 3))
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    feeds["cond"] = np.array(cond)
    prepared = _prepare_and_compare(model, feeds)
    ops = _ops(prepared)
    assert "Constant" not in ops and "Transpose" not in ops
    assert ops.count("Mul") == 1  # only ``Mul(x, c2)`` in the then branch reads an input
    loop = next(node for node in prepared.graph if node.op_type == "Loop")
    body = loop.attributes["body"].as_graph()
    assert [node.op_type for node in body] == ["Identity", "MatMul", "Add"]


def test_unknown_domain_is_refused_with_node_and_domain():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "foo.bar" : 1]>
    g (float[2] x) => (float[2] y) {
      r = Relu (x)
      [my_custom] y = foo.bar.Custom (r)
    }
    """)
    model = ir.from_proto(proto)
    with pytest.raises(UnsupportedModelError, match=r"node 'my_custom' uses op domain 'foo\.bar'"):
        prepare(model)
    infer_shapes(model)  # shape inference skips the unknown op instead of failing
    assert model.graph[0].outputs[0].shape == ir.Shape([2])


def test_local_function_domain_is_accepted():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "my.funcs" : 1]>
    g (float[2,3] x) => (float[2,3] y) {
      y = my.funcs.Twice (x)
    }
    <domain: "my.funcs", opset_import: ["" : 17]>
    Twice (a) => (b) {
      b = Add (a, a)
    }
    """)
    model = ir.from_proto(proto)
    check_domains(model)
    _prepare_and_compare(model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_exported_conv_bn_relu():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(8)
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.normal_()
    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 8, 8),),
        buffer,
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        input_names=["x"],
        output_names=["y"],
    )
    model = ir.from_proto(onnx.load_from_string(buffer.getvalue()))
    assert "BatchNormalization" in _ops(model)
    prepared = _prepare_and_compare(model)
    assert _ops(prepared) == ["Conv", "Relu"]
