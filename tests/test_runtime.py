"""Sessions on a named provider: no silent CPU fallback, clear errors, a recorded environment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from onnxq import runtime
from onnxq.errors import CalibrationDataError, InvalidModelError, ProviderError
from onnxq.runtime import (
    Provider,
    available_providers,
    environment,
    make_session,
    run_float_outputs,
)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
relu_add (float[N, 4] x) => (float[N, 4] y) {
    r = Relu(x)
    one = Constant<value = float {1.0}>()
    y = Add(r, one)
}
"""


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model(MODEL), path)
    return path


def test_cpu_is_always_available() -> None:
    assert Provider.CPU in available_providers()
    assert Provider("cuda").ort_name == "CUDAExecutionProvider"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_make_session_runs_on_cpu(model_path: Path, as_bytes: bool) -> None:
    source = model_path.read_bytes() if as_bytes else model_path
    session = make_session(source, "cpu")
    assert session.get_providers()[0] == "CPUExecutionProvider"
    x = np.array([[-1.0, 0.0, 2.0, 3.0]], dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, [[1.0, 1.0, 3.0, 4.0]])


@pytest.mark.skipif(HAS_CUDA, reason="checks the message where CUDA is absent")
def test_cuda_missing_is_a_clear_provider_error(model_path: Path) -> None:
    with pytest.raises(ProviderError) as info:
        make_session(model_path, Provider.CUDA)
    message = str(info.value)
    assert message.startswith("CUDA execution provider is not available (onnxruntime ")
    assert "CPUExecutionProvider" in message
    assert "install the onnxruntime-gpu build on a machine with an NVIDIA GPU" in message


def test_cuda_session_that_fell_back_to_cpu_is_refused(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT falls back to CPU when the CUDA libraries fail to load; onnxq must not accept that."""

    class FellBack:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.providers = kwargs["providers"]

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(
        runtime.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(runtime.ort, "InferenceSession", FellBack)
    with pytest.raises(ProviderError, match="instead of CUDAExecutionProvider"):
        make_session(model_path, "cuda")


def test_unknown_provider(model_path: Path) -> None:
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu'"):
        make_session(model_path, "tpu")


def test_bad_models_are_invalid_model_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="no such file"):
        make_session(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(InvalidModelError, match="onnxruntime cannot load"):
        make_session(garbage)


def test_optimized_model_path_and_levels(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "opt.onnx"
    make_session(model_path, optimization_level="disabled", optimized_model_path=out)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Relu" in ops and "Add" in ops
    with pytest.raises(ValueError):
        make_session(model_path, optimization_level="max")
    with pytest.raises(ValueError, match="intra_op_threads"):
        make_session(model_path, intra_op_threads=0)
    make_session(model_path, intra_op_threads=1)


def test_environment_records_where_it_ran() -> None:
    env = environment("cpu", intra_op_threads=2)
    json.dumps(env)
    assert env["provider"] == "cpu"
    assert env["ort_provider"] == "CPUExecutionProvider"
    assert env["onnxruntime"] == ort.__version__
    assert env["intra_op_threads"] == 2
    assert {"avx2", "avx512", "vnni", "u8s8_saturates"} <= set(env["cpu_features"])
    assert env["cpu_model"] and env["python"] and env["platform"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDAExecutionProvider")
def test_cuda_session_runs_on_cuda(model_path: Path) -> None:
    session = make_session(model_path, "cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    assert "gpu" in environment("cuda")


SPLIT = """
<ir_version: 8, opset_import: ["" : 17]>
split (float[N] x, int64[2] shape) => (seq(float) parts, float[N] y, int64[2] n, float[A, B] z) {
    parts = SplitToSequence<keepdims = 0>(x, two)
    two = Constant<value = int64[2] {1, 2}>()
    y = Relu(x)
    n = Identity(shape)
    z = Reshape(x, shape)
}
"""


def test_run_float_outputs_keeps_float_tensors_and_refuses_bad_data_in_one_line():
    session = make_session(onnx.parser.parse_model(SPLIT).SerializeToString())
    x = np.array([-1.0, 2.0, 3.0], np.float32)
    y, z = run_float_outputs(session, {"x": x, "shape": np.array([3, 1])})  # uneven parts skipped
    np.testing.assert_array_equal(y, [0.0, 2.0, 3.0])
    assert z.shape == (3, 1)
    with pytest.raises(CalibrationDataError, match="ONNX Runtime fails on the data") as err:
        run_float_outputs(session, {"x": x, "shape": np.array([2, 2])})
    assert "\n" not in str(err.value)
