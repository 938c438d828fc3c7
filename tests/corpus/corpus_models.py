"""Third-party ONNX models for the corpus test, by source: the ONNX package's backend test
models, the two PyTorch exporters, skl2onnx, and graphs written with ``onnx.helper``.

Every entry is built here from what is installed (nothing is downloaded) and carries the inputs
to calibrate and check it with: the backend tests' own data where they ship it, otherwise
random data made from the model's input types.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh

from onnxq.model_io import input_specs

Feed = dict[str, Any]


@dataclass(frozen=True)
class Entry:
    """One corpus model: where it came from, how to build it, and its feeds (``None``: built
    from the model's input types)."""

    source: str
    name: str
    build: Callable[[], tuple[onnx.ModelProto, Feed | None]]

    @property
    def id(self) -> str:
        return f"{self.source}/{self.name}"


def random_feed(model: onnx.ModelProto, seed: int = 0) -> Feed:
    """Inputs for ``model``'s tensor inputs: symbolic dims 2, floats normal, ints in [0, 3)."""
    rng = np.random.default_rng(seed)
    feed: Feed = {}
    for spec in input_specs(model):
        shape = [2 if dim is None else dim for dim in (spec.shape or (2,))]
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = rng.random(shape) > 0.5
        else:
            feed[spec.name] = rng.integers(0, 3, shape).astype(spec.dtype)
    return feed


# --- the ONNX package's backend test models -------------------------------------------------

# Node tests (built by ``onnx.backend.test.case``; the wheel ships no node model files): control
# flow, sequences, optionals, recurrent ops, strings, half precision, quantizable ops, opsets 8-24.
NODE_CASES = (
    "test_if", "test_if_seq", "test_if_opt", "test_loop11", "test_loop13_seq",
    "test_loop16_seq_none", "test_scan_sum", "test_scan9_sum",
    "test_range_float_type_positive_delta_expanded", "test_sequence_insert_at_back",
    "test_sequence_map_add_2_sequences", "test_sequence_map_identity_1_sequence",
    "test_split_to_sequence_1", "test_split_to_sequence_2", "test_identity_sequence",
    "test_identity_opt", "test_optional_get_element_sequence",
    "test_optional_has_element_empty_optional_input", "test_lstm_defaults",
    "test_lstm_with_peepholes", "test_lstm_batchwise", "test_gru_seq_length",
    "test_gru_with_initial_bias", "test_simple_rnn_defaults", "test_rnn_seq_length",
    "test_strnormalizer_export_monday_casesensintive_lower",
    "test_ai_onnx_ml_label_encoder_string_int", "test_string_concat", "test_regex_full_match_basic",
    "test_attention_4d_fp16", "test_max_float16", "test_cast_FLOAT_to_FLOAT16",
    "test_einsum_batch_matmul", "test_matmul_3d", "test_gemm_all_attributes",
    "test_gemm_default_single_elem_vector_bias", "test_basic_conv_with_padding",
    "test_conv_with_strides_and_asymmetric_padding", "test_convtranspose_pads",
    "test_attention_4d_diff_heads_mask4d_padded_kv", "test_layer_normalization_4d_axis1",
    "test_softmax_example", "test_averagepool_2d_pads", "test_maxpool_2d_default",
    "test_resize_upsample_scales_linear", "test_instancenorm_example", "test_mvn",
    "test_prelu_broadcast", "test_where_example", "test_gelu_tanh_1", "test_lrn",
    "test_gathernd_example_float32", "test_bitwise_and_ui8_bcast_4v3d", "test_reflect_pad",
    "test_nonzero_example", "test_top_k", "test_roialign_aligned_true",
)  # fmt: skip

# Model directories in the wheel, with their test data: PyTorch's old exporter at opset 6-9.
DATA_DIRS = (
    "pytorch-converted/test_PReLU_2d_multiparam", "pytorch-converted/test_Conv2d",
    "pytorch-converted/test_Conv2d_depthwise_strided", "pytorch-converted/test_ConvTranspose2d",
    "pytorch-converted/test_Linear", "pytorch-converted/test_BatchNorm2d_eval",
    "pytorch-converted/test_Embedding", "pytorch-converted/test_GLU",
    "pytorch-converted/test_PixelShuffle", "pytorch-operator/test_operator_conv",
    "pytorch-operator/test_operator_mm", "pytorch-operator/test_operator_addmm",
    "pytorch-operator/test_operator_non_float_params", "simple/test_sequence_model1",
    "simple/test_sequence_model5", "simple/test_single_relu_model", "simple/test_gradient_of_add",
    "light/light_squeezenet.onnx", "light/light_shufflenet.onnx",
)  # fmt: skip


@functools.cache
def _node_cases() -> dict[str, Any]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {case.name: case for case in collect_testcases(None)}


def _to_value(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return nh.to_array(value)
    if isinstance(value, onnx.SequenceProto):
        return [nh.to_array(t) for t in value.tensor_values]
    return value


def _node_case(name: str) -> tuple[onnx.ModelProto, Feed | None]:
    case = _node_cases()[name]
    if not case.data_sets:
        return case.model, None
    names = [i.name for i in case.model.graph.input]
    return case.model, {n: _to_value(v) for n, v in zip(names, case.data_sets[0][0], strict=False)}


def _data_dir(name: str) -> tuple[onnx.ModelProto, Feed | None]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data" / name
    if root.suffix:  # a light model: no input data ships with it
        return onnx.load(os.fspath(root)), None
    model = onnx.load(os.fspath(root / "model.onnx"))
    inputs = sorted(root.glob("test_data_set_0/input_*.pb"))
    names = [spec.name for spec in input_specs(model)]
    arrays = [nh.to_array(onnx.load_tensor(os.fspath(p))) for p in inputs]
    return model, dict(zip(names, arrays, strict=False))


def onnx_backend_entries() -> list[Entry]:
    entries = [Entry("onnx-node", n, functools.partial(_node_case, n)) for n in NODE_CASES]
    entries += [Entry("onnx-data", n, functools.partial(_data_dir, n)) for n in DATA_DIRS]
    return entries


# --- PyTorch: the TorchScript exporter and the dynamo (torch.export) exporter ----------------


def _torch_modules() -> dict[str, tuple[Any, tuple[int, ...]]]:
    import torch

    nn = torch.nn

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class Cnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(16, 4),
            )  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    class Lstm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    class BiGru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(8, 16, bidirectional=True), nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    class Cond(nn.Module):  # a data-dependent If (dynamo: torch.cond)
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: self.a(t), lambda t: self.b(t).relu(), (x,))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    return {
        "mlp": (Mlp, (4, 12)),
        "cnn": (Cnn, (2, 3, 16, 16)),
        "lstm": (Lstm, (2, 5, 8)),
        "bigru": (BiGru, (5, 2, 8)),
        "cond": (Cond, (3, 8)),
        "encoder": (Encoder, (2, 6, 16)),
    }


@functools.cache
def _scripted_if() -> Any:
    import torch

    class Branchy(torch.nn.Module):  # scripted: its data-dependent branch and loop stay in ONNX
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x) if bool(x.sum() > 0) else self.b(x).relu()
            for _ in range(int(x.shape[0])):
                y = self.a(y).tanh()
            return y

    return torch.jit.script(Branchy())


# (module, exporter, opset): the TorchScript exporter at opsets 9-17, dynamo at 18-21.
TORCH_CASES = (
    ("mlp", "torchscript", 9), ("mlp", "torchscript", 13), ("mlp", "dynamo", 21),
    ("cnn", "torchscript", 9), ("cnn", "torchscript", 11), ("cnn", "dynamo", 20),
    ("lstm", "torchscript", 9), ("lstm", "torchscript", 14), ("lstm", "dynamo", 18),
    ("bigru", "torchscript", 11), ("cond", "dynamo", 18), ("scripted_if", "torchscript", 13),
    ("encoder", "torchscript", 17), ("encoder", "dynamo", 19),
)  # fmt: skip


def _torch_export(name: str, exporter: str, opset: int) -> tuple[onnx.ModelProto, Feed | None]:
    import io

    import torch

    torch.manual_seed(0)
    if name == "scripted_if":
        module, shape = _scripted_if(), (3, 8)
    else:
        factory, shape = _torch_modules()[name]
        module = factory().eval()
    example = torch.randn(*shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, verbose=False
            )
            model = program.model_proto
        else:
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=["x"], output_names=["y"],
            )  # fmt: skip
            model = onnx.load_from_string(buffer.getvalue())
    return model, {model.graph.input[0].name: example.numpy()}


def torch_entries() -> list[Entry]:
    return [
        Entry(
            f"torch-{exporter}",
            f"{name}-opset{opset}",
            functools.partial(_torch_export, name, exporter, opset),
        )
        for name, exporter, opset in TORCH_CASES
    ]


# --- skl2onnx: ai.onnx.ml ops, ZipMap's sequence-of-map outputs --------------------------------


def _sklearn_model(name: str, opset: int) -> tuple[onnx.ModelProto, Feed | None]:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    estimators = {
        "logreg": lambda: LogisticRegression(max_iter=500),
        "forest": lambda: RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0),
        "mlp": lambda: MLPClassifier((32,), max_iter=300, random_state=0),
        "svc": lambda: SVC(probability=True, random_state=0),
        "scaler_pca_linear": lambda: make_pipeline(StandardScaler(), PCA(3), LinearRegression()),
        "mlp_regressor": lambda: MLPRegressor(
            hidden_layer_sizes=(16, 16), max_iter=300, random_state=0
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator = estimators[name]().fit(x, y)
        model = to_onnx(estimator, x[:1], target_opset={"": opset, "ai.onnx.ml": 1})
    return model, {model.graph.input[0].name: x[::5]}


SKLEARN_CASES = (
    ("logreg", 9), ("logreg", 17), ("forest", 12), ("forest", 15), ("mlp", 13), ("mlp", 21),
    ("svc", 10), ("scaler_pca_linear", 17), ("mlp_regressor", 19),
)  # fmt: skip


def sklearn_entries() -> list[Entry]:
    return [
        Entry("skl2onnx", f"{name}-opset{opset}", functools.partial(_sklearn_model, name, opset))
        for name, opset in SKLEARN_CASES
    ]


# --- graphs written with onnx.helper: subgraphs with weights, non-tensor and string inputs ----

H = 8


def _w(name: str, shape: tuple[int, ...], seed: int, dtype: Any = np.float32) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return nh.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype), name)


def _graph_model(nodes, inputs, outputs, inits, opset: int, **kw: Any) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [oh.make_opsetid("", opset), *kw.pop("extra_opsets", [])]
    return oh.make_model(graph, opset_imports=opsets, **kw)


def _x(dtype: int = onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info("x", dtype, ["N", H])


def _y(dtype: int = onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info("y", dtype, ["N", H])


def _branch(name: str, weight: str, op: str) -> onnx.GraphProto:
    nodes = [
        oh.make_node("MatMul", ["x", weight], [f"{name}_m"]),
        oh.make_node(op, [f"{name}_m"], [f"{name}_out"]),
    ]
    return oh.make_graph(
        nodes,
        name,
        [],
        [oh.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, ["N", H])],
    )


def if_with_weights(opset: int) -> onnx.ModelProto:
    nodes = [
        oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        oh.make_node("Greater", ["s", "zero"], ["c"]),
        oh.make_node(
            "If",
            ["c"],
            ["h"],
            then_branch=_branch("then", "Wa", "Relu"),
            else_branch=_branch("else", "Wb", "Tanh"),
        ),
        oh.make_node("MatMul", ["h", "Wc"], ["y"]),
    ]
    inits = [
        _w("Wa", (H, H), 1),
        _w("Wb", (H, H), 2),
        _w("Wc", (H, H), 3),
        nh.from_array(np.array(0, np.float32), "zero"),
    ]
    return _graph_model(nodes, [_x()], [_y()], inits, opset)


def loop_with_weights() -> onnx.ModelProto:
    body = oh.make_graph(
        [oh.make_node("MatMul", ["h_in", "W"], ["m"]), oh.make_node("Tanh", ["m"], ["h_out"]),
         oh.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [oh.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         oh.make_tensor_value_info("h_in", onnx.TensorProto.FLOAT, ["N", H])],
        [oh.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         oh.make_tensor_value_info("h_out", onnx.TensorProto.FLOAT, ["N", H])],
    )  # fmt: skip
    nodes = [
        oh.make_node("Loop", ["trips", "", "x"], ["h"], body=body),
        oh.make_node("MatMul", ["h", "W"], ["y"]),
    ]
    inits = [_w("W", (H, H), 4), nh.from_array(np.array(3, np.int64), "trips")]
    return _graph_model(nodes, [_x()], [_y()], inits, 13)


def scan_with_weights() -> onnx.ModelProto:
    body = oh.make_graph(
        [oh.make_node("MatMul", ["xt", "W"], ["m"]),
         oh.make_node("Add", ["m", "acc_in"], ["acc_out"]),
         oh.make_node("Relu", ["acc_out"], ["yt"])],
        "body",
        [oh.make_tensor_value_info("acc_in", onnx.TensorProto.FLOAT, [H]),
         oh.make_tensor_value_info("xt", onnx.TensorProto.FLOAT, [H])],
        [oh.make_tensor_value_info("acc_out", onnx.TensorProto.FLOAT, [H]),
         oh.make_tensor_value_info("yt", onnx.TensorProto.FLOAT, [H])],
    )  # fmt: skip
    nodes = [oh.make_node("Scan", ["init", "x"], ["acc", "y"], body=body, num_scan_inputs=1)]
    inits = [_w("W", (H, H), 5), nh.from_array(np.zeros(H, np.float32), "init")]
    outputs = [oh.make_tensor_value_info("acc", onnx.TensorProto.FLOAT, [H]), _y()]
    return _graph_model(nodes, [_x()], outputs, inits, 16)


def string_input() -> onnx.ModelProto:
    nodes = [
        oh.make_node("LabelEncoder", ["x"], ["f"], domain="ai.onnx.ml",
                     keys_strings=["a", "b", "c"], values_floats=[0.5, -1.0, 2.0],
                     default_float=0.0),
        oh.make_node("MatMul", ["f", "W"], ["y"]),
    ]  # fmt: skip
    return _graph_model(
        nodes,
        [_x(onnx.TensorProto.STRING)],
        [_y()],
        [_w("W", (H, H), 6)],
        15,
        extra_opsets=[oh.make_opsetid("ai.onnx.ml", 2)],
    )


def sequence_input() -> onnx.ModelProto:
    seq = oh.make_tensor_sequence_value_info("x", onnx.TensorProto.FLOAT, ["N", H])
    nodes = [
        oh.make_node("SequenceAt", ["x", "zero"], ["a"]),
        oh.make_node("MatMul", ["a", "W"], ["y"]),
    ]
    inits = [_w("W", (H, H), 7), nh.from_array(np.array(0, np.int64), "zero")]
    return _graph_model(nodes, [seq], [_y()], inits, 13)


def optional_input() -> onnx.ModelProto:
    tensor = oh.make_tensor_type_proto(onnx.TensorProto.FLOAT, ["N", H])
    opt = oh.make_value_info("x", oh.make_optional_type_proto(tensor))
    nodes = [
        oh.make_node("OptionalGetElement", ["x"], ["a"]),
        oh.make_node("MatMul", ["a", "W"], ["y"]),
    ]
    return _graph_model(nodes, [opt], [_y()], [_w("W", (H, H), 8)], 18)


def half_mlp() -> onnx.ModelProto:
    nodes = [
        oh.make_node("MatMul", ["x", "W1"], ["a"]), oh.make_node("Add", ["a", "b1"], ["b"]),
        oh.make_node("Relu", ["b"], ["c"]), oh.make_node("MatMul", ["c", "W2"], ["y"]),
    ]  # fmt: skip
    inits = [
        _w("W1", (H, 16), 9, np.float16),
        _w("b1", (16,), 10, np.float16),
        _w("W2", (16, H), 11, np.float16),
    ]
    f16 = onnx.TensorProto.FLOAT16
    return _graph_model(nodes, [_x(f16)], [_y(f16)], inits, 17)


def upsample_opset9() -> onnx.ModelProto:
    image = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    nodes = [
        oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Upsample", ["c", "scales"], ["y"], mode="nearest"),
    ]
    inits = [
        _w("W", (4, 3, 3, 3), 12),
        _w("B", (4,), 13),
        nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    out = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 16, 16])
    return _graph_model(nodes, [image], [out], inits, 9)


def local_function() -> onnx.ModelProto:
    fn = oh.make_function(
        "local", "Dense", ["t", "w"], ["o"],
        [oh.make_node("MatMul", ["t", "w"], ["m"]), oh.make_node("Relu", ["m"], ["o"])],
        [oh.make_opsetid("", 17)],
    )  # fmt: skip
    nodes = [
        oh.make_node("Dense", ["x", "W"], ["h"], domain="local"),
        oh.make_node("MatMul", ["h", "W"], ["y"]),
    ]
    model = _graph_model(
        nodes, [_x()], [_y()], [_w("W", (H, H), 14)], 17, extra_opsets=[oh.make_opsetid("local", 1)]
    )
    model.functions.append(fn)
    return model


HELPER_CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "if-opset11": functools.partial(if_with_weights, 11),
    "if-opset21": functools.partial(if_with_weights, 21),
    "loop-opset13": loop_with_weights,
    "scan-opset16": scan_with_weights,
    "string-input": string_input,
    "sequence-input": sequence_input,
    "optional-input": optional_input,
    "float16-mlp": half_mlp,
    "upsample-opset9": upsample_opset9,
    "local-function": local_function,
}


def _helper_model(name: str) -> tuple[onnx.ModelProto, Feed | None]:
    model = HELPER_CASES[name]()
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    feeds: dict[str, Feed] = {
        "string-input": {"x": rng.choice(np.array(["a", "b", "c", "z"], dtype=object), (4, H))},
        "sequence-input": {"x": [rng.standard_normal((4, H)).astype(np.float32)] * 2},
        "optional-input": {"x": rng.standard_normal((4, H)).astype(np.float32)},
    }
    return model, feeds.get(name)


def helper_entries() -> list[Entry]:
    return [Entry("onnx-helper", n, functools.partial(_helper_model, n)) for n in HELPER_CASES]


def all_entries() -> list[Entry]:
    return onnx_backend_entries() + torch_entries() + sklearn_entries() + helper_entries()
