"""The default target is exact on x86 without VNNI: its integer weights and activations never
saturate the int16 pair sums of ORT's AVX2 u8s8 kernels (``vpmaddubsw``), emulated in numpy,
so this holds whatever CPU runs the test."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import helper, numpy_helper
from support import cpuid_masked_env, sqnr_db

from benchmarks.cpu_mask import unmasked_env
from onnxq.config import QuantConfig
from onnxq.isa import cpu_features
from onnxq.model_io import save_model
from onnxq.pipeline import quantize
from onnxq.saturation import (
    exact_matmul,
    pair_saturated_matmul,
    risky_pairs,
    saturation_risk,
)

seven_bit = arrays(np.int8, (6, 3), elements=st.integers(-64, 64))
activations = arrays(np.uint8, (2, 6), elements=st.integers(0, 255))


@given(activations, seven_bit)
def test_seven_bit_weights_never_saturate(a, w):
    assert np.array_equal(pair_saturated_matmul(a, w), exact_matmul(a, w))
    assert not risky_pairs(w).any()


def test_a_same_sign_pair_above_128_saturates_and_is_flagged():
    a = np.array([[255, 255]], dtype=np.uint8)
    w = np.array([[100], [40]], dtype=np.int8)
    assert exact_matmul(a, w)[0, 0] == 255 * 140
    assert pair_saturated_matmul(a, w)[0, 0] == np.iinfo(np.int16).max
    assert risky_pairs(w).all()
    assert not risky_pairs(np.array([[100], [-40]], dtype=np.int8)).any()  # opposite signs


def _integer_operands(
    model: onnx.ModelProto, feed: dict
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per quantized Conv/Gemm: (name, uint8 activation matrix [M, K], int8 weights [K, N])."""
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        a_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        layers.append((node, a_dq.input[0], constants[w_dq.input[0]]))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for _, tensor, _ in layers:
        probe.graph.output.append(
            helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None)
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    values = session.run([tensor for _, tensor, _ in layers], feed)
    out = []
    for (node, _, weight), value in zip(layers, values, strict=True):
        if node.op_type == "Conv":
            zero_point = constants[producer[node.input[0]].input[2]]
            padded = np.pad(value, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zero_point)
            windows = np.lib.stride_tricks.sliding_window_view(
                padded, weight.shape[2:], axis=(2, 3)
            )
            matrix = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, int(np.prod(weight.shape[1:])))
            out.append((node.name, matrix, weight.reshape(weight.shape[0], -1).T))
        else:
            out.append((node.name, value.reshape(value.shape[0], -1), weight.T))
    return out


@pytest.fixture(scope="module")
def cnn_and_data():
    from support import make_cnn

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 3, 16, 16)) * 2.0).astype(np.float32)
    return make_cnn(rng), {"x": x}


def test_default_target_is_exact_under_avx2_emulation(cnn_and_data):
    model, feed = cnn_and_data
    int8 = quantize(model, feed, QuantConfig(weight_rounding="nearest"))
    layers = _integer_operands(int8, feed)
    assert {name for name, _, _ in layers} == {"conv1", "conv2", "conv3", "fc"}
    for name, a, w in layers:
        assert np.abs(w.astype(np.int32)).max() <= 64, name
        assert np.array_equal(pair_saturated_matmul(a, w), exact_matmul(a, w)), name
    assert saturation_risk(int8) is None


def test_vnni_target_saturates_under_avx2_emulation(cnn_and_data):
    """The contrast: full 8-bit weights (ort-x86-vnni) do saturate on the same data, and
    ``saturation_risk`` (what inspect/compare warn with) names those layers."""
    model, feed = cnn_and_data
    int8 = quantize(model, feed, QuantConfig(target="ort-x86-vnni", weight_rounding="nearest"))
    saturated = [
        name
        for name, a, w in _integer_operands(int8, feed)
        if not np.array_equal(pair_saturated_matmul(a, w), exact_matmul(a, w))
    ]
    assert saturated
    risk = saturation_risk(int8)
    assert risk is not None and set(saturated) <= set(risk.nodes)


RUN_MODELS = """
import sys, numpy as np, onnxruntime as ort
feed = dict(np.load(sys.argv[1]))
out = {}
for path in sys.argv[3:]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out[path] = session.run(None, feed)[0]
np.savez(sys.argv[2], *[out[p] for p in sys.argv[3:]])
"""


def _run_on(
    cpu: list[str], paths: list[Path], feed: dict, folder: Path, env: dict | None = None
) -> list[np.ndarray]:
    """Outputs of ``paths`` from ONNX Runtime in a subprocess started with ``cpu`` (a command
    prefix: empty for this CPU, or a QEMU user-mode emulator with a CPU model) and ``env``."""
    inputs, outputs = folder / "feed.npz", folder / f"out-{len(cpu)}-{env is None}.npz"
    np.savez(inputs, **feed)
    command = [*cpu, sys.executable, "-c", RUN_MODELS, inputs, outputs, *paths]
    subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=600, env=env)
    with np.load(outputs) as saved:
        return [saved[f"arr_{i}"] for i in range(len(paths))]


def _qemu_haswell() -> tuple[list[str], dict]:
    if shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64":
        pytest.skip("needs QEMU user-mode emulation (Debian: apt install qemu-user) on x86_64")
    return ["qemu-x86_64", "-cpu", "Haswell"], unmasked_env()


def _cpuid_masked(profile: str) -> Callable[[], tuple[list[str], dict]]:
    return lambda: ([], cpuid_masked_env(profile))


@pytest.mark.parametrize(
    "no_vnni_cpu",
    [_qemu_haswell, _cpuid_masked("avx2"), _cpuid_masked("avx512-no-vnni")],
    ids=["qemu-haswell", "mask-avx2", "mask-avx512-no-vnni"],
)
def test_on_onnx_runtimes_own_kernels_without_vnni(cnn_and_data, tmp_path, no_vnni_cpu):
    """ONNX Runtime itself dispatching for an x86 CPU without VNNI: on an emulated Haswell, or
    natively with CPUID bits hidden (``benchmarks.cpu_mask``): AVX2 (the same bits as QEMU's
    Haswell) or AVX-512 without VNNI (Skylake-SP, whose AVX-512BW kernels saturate alike). Its
    real saturating u8s8 kernels run: the default target gives bit-identical outputs; the
    VNNI-only target, where this CPU has VNNI, visibly does not (which also proves the dispatch
    reached those kernels). Measured on ResNet-18 the same way: ort-cpu 29.7 dB on both CPUs,
    ort-x86-vnni 30.7 dB here, 11.1 dB on Haswell."""
    prefix, env = no_vnni_cpu()
    model, feed = cnn_and_data
    paths = []
    for target in ("ort-cpu", "ort-x86-vnni"):
        paths.append(tmp_path / f"{target}.onnx")
        save_model(quantize(model, feed, QuantConfig(target=target)), paths[-1])
    here = _run_on([], paths, feed, tmp_path)
    there = _run_on(prefix, paths, feed, tmp_path, env)
    np.testing.assert_array_equal(there[0], here[0])  # measured: bit-identical
    if not cpu_features().u8s8_saturates:  # this CPU sums exactly: that one must differ
        assert sqnr_db(here[1], there[1]) < 50  # measured 44.4 dB (AVX2) from this CPU's output
