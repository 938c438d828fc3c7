"""Deployment targets: the scheme comes from the target (never the host CPU), is recorded in the
model, each target's rules hold on what onnxq writes for it, and ``onnxq check`` catches every
rule broken on a model that breaks it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from support import make_cnn, run, sqnr_db

from onnxq.cli import main
from onnxq.config import QuantConfig
from onnxq.dynamic import quantize_dynamic
from onnxq.errors import ConfigError
from onnxq.isa import CpuFeatures
from onnxq.pipeline import quantize, quantize_with_report
from onnxq.targets import TARGETS, get_target
from onnxq.targets.check import RULES, check_model
from onnxq.weight_only import quantize_weight_only

NEAREST = {"weight_rounding": "nearest"}


@pytest.fixture(scope="module")
def cnn_and_data() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return make_cnn(rng), {"x": rng.standard_normal((16, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def per_target(cnn_and_data) -> dict[str, onnx.ModelProto]:
    model, data = cnn_and_data
    return {
        name: quantize(model, data, QuantConfig(target=name, **NEAREST))
        for name, target in TARGETS.items()
        if "static" in {m.value for m in target.modes}
    }


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def test_unknown_target_lists_the_known_ones(cnn_path, tmp_path):
    with pytest.raises(ConfigError, match="known targets: ort-cpu, "):
        QuantConfig(target="jetson")
    result = CliRunner().invoke(
        main, ["quantize", str(cnn_path), "-o", str(tmp_path / "q.onnx"), "--target", "x"]
    )
    assert result.exit_code == 2 and "ort-cpu" in result.output
    assert not (tmp_path / "q.onnx").exists()


def test_a_target_refuses_a_scheme_or_mode_its_runtime_cannot_run(cnn_and_data):
    model, data = cnn_and_data
    with pytest.raises(ConfigError, match="tensorrt needs activation_type=int8"):
        quantize(model, data, QuantConfig(target="tensorrt", activation_type="uint8"))
    with pytest.raises(ConfigError, match="supports --mode static, not dynamic"):
        quantize_dynamic(model, QuantConfig(target="qnn"))


def test_schemes_and_op_types_a_mode_cannot_write_are_refused(cnn_and_data):
    model, data = cnn_and_data
    with pytest.raises(ConfigError, match="activation_type must be one of uint8, int8, uint16"):
        QuantConfig(activation_type="uint4")
    with pytest.raises(ConfigError, match="dynamic quantizes activations to uint8 at run time"):
        quantize_dynamic(model, QuantConfig(activation_type="int16"))
    with pytest.raises(ConfigError, match="weight-only keeps activations float"):
        quantize_weight_only(model, QuantConfig(activation_type="int8"))
    with pytest.raises(ConfigError, match="static mode has no rule for matmul"):
        quantize(model, data, QuantConfig(op_types=("matmul",)))


def test_dynamic_mode_records_the_uint8_activations_it_writes(cnn_and_data):
    """ort-arm64's static activations are int8; DynamicQuantizeLinear writes uint8 anyway."""
    model, _ = cnn_and_data
    quantized = quantize_dynamic(model, QuantConfig(target="ort-arm64"))
    assert json.loads(_metadata(quantized)["onnxq.scheme"])["activation_type"] == "uint8"
    assert {n.op_type for n in quantized.graph.node} >= {"DynamicQuantizeLinear"}


def test_the_host_cpu_never_changes_the_file(cnn_and_data, monkeypatch):
    """Same command, CPUs with and without VNNI (and ARM): byte-identical models."""
    import onnxq.isa

    model, data = cnn_and_data
    written = set()
    for features in (
        CpuFeatures("x86_64", avx2=True, avx512=False, vnni=False),
        CpuFeatures("x86_64", avx2=True, avx512=True, vnni=True),
        CpuFeatures("aarch64", avx2=False, avx512=False, vnni=False),
    ):
        monkeypatch.setattr(onnxq.isa, "cpu_features", lambda features=features: features)
        written.add(quantize(model, data, QuantConfig(**NEAREST)).SerializeToString())
    assert len(written) == 1


@pytest.mark.parametrize("name", ["ort-cpu", "ort-x86-vnni", "ort-arm64", "tensorrt", "qnn"])
def test_target_and_scheme_are_recorded(cnn_and_data, name):
    model, data = cnn_and_data
    result = quantize_with_report(model, data, QuantConfig(target=name, **NEAREST))
    target = get_target(name)
    recorded = _metadata(result.model)
    assert recorded["onnxq.target"] == name
    scheme = json.loads(recorded["onnxq.scheme"])
    assert scheme["activation_type"] == target.activation_type.value
    assert scheme["weight_bits"] == (7 if target.reduce_range else 8)
    assert result.report.to_dict()["target"]["name"] == name
    assert result.report.config["target"] == name


@pytest.mark.parametrize("name", ["ort-cpu", "ort-x86-vnni", "ort-arm64", "tensorrt", "qnn"])
def test_every_target_meets_its_own_rules_and_stays_accurate(per_target, cnn_and_data, name):
    """Accuracy is measured in ORT CPU on the float (fake-quant) graph, the same on every CPU."""
    model, data = cnn_and_data
    quantized = per_target[name]
    report = check_model(quantized, name)
    assert report.ok, [v.describe() for v in report.violations]
    reference = run(model, data)[0]
    assert sqnr_db(reference, run(quantized, data, fused=False)[0]) >= 25.0


def test_tensorrt_is_symmetric_with_float_biases_and_quantized_residuals(per_target):
    model = per_target["tensorrt"]
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            assert not np.any(constants[node.input[2]]), node.name
    add = next(n for n in model.graph.node if n.op_type == "Add")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert [producers[i] for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        assert conv.input[2] in constants and constants[conv.input[2]].dtype == np.float32


def test_qnn_writes_uint16_activations_in_the_microsoft_domain_below_opset_21(per_target):
    model = per_target["qnn"]
    activation_qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_qs and {n.domain for n in activation_qs} == {"com.microsoft"}
    constants = {t.name: t for t in model.graph.initializer}
    assert {constants[n.input[2]].data_type for n in activation_qs} == {onnx.TensorProto.UINT16}


def test_ort_mobile_writes_an_ort_file_equal_to_the_onnx(cnn_path, cnn_calib, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **cnn_calib)
    out = tmp_path / "q.onnx"
    args = ["quantize", str(cnn_path), "-o", str(out), "--calib", str(calib)]
    result = CliRunner().invoke(main, [*args, "--target", "ort-mobile"])
    assert result.exit_code == 0, result.output
    ort_file = tmp_path / "q.ort"
    assert ort_file.exists() and f"wrote {ort_file}" in result.output
    feed = {"x": cnn_calib["x"][:4]}
    from_onnx = run(out, feed)[0]
    session = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feed)[0], from_onnx, rtol=1e-5, atol=1e-6)


# --- onnxq check: every rule caught on a model that breaks it -----------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(array, name))


def _node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _nonzero_activation_zero_point(models):
    model = _copy(models["tensorrt"])
    q = _node(model, "QuantizeLinear")
    _set_initializer(model, q.input[2], np.array(3, dtype=np.int8))
    return model, "tensorrt"


def _wrong_per_channel_axis(models):
    model = _copy(models["ort-cpu"])
    dq = _producer(model, _node(model, "Conv").input[1])
    next(a for a in dq.attribute if a.name == "axis").i = 1
    return model, "ort-cpu"


def _float_activation_into_quantized_conv(models):
    model = _copy(models["ort-cpu"])
    conv = _node(model, "Conv")
    conv.input[0] = _producer(model, conv.input[0]).input[0]  # Q output -> skip its DQ
    conv.input[0] = _producer(model, conv.input[0]).input[0]  # ... and the Q: float input
    return model, "ort-cpu"


def _wrong_bias_scale(models):
    model = _copy(models["ort-cpu"])
    bias_dq = _producer(model, _node(model, "Conv").input[2])
    scale = numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == bias_dq.input[1])
    )
    _set_initializer(model, bias_dq.input[1], (scale * 2).astype(np.float32))
    return model, "ort-cpu"


def _float_residual_input(models):
    model = _copy(models["tensorrt"])
    add = _node(model, "Add")
    dq = _producer(model, add.input[1])
    add.input[1] = _producer(model, dq.input[0]).input[0]
    return model, "tensorrt"


def _old_opset(models):
    model = _copy(models["qnn"])
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 11
    return model, "qnn"


def _control_flow(models):
    model = _copy(models["qnn"])
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["y"], ["z"])],
        "branch",
        [],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
    )
    cond = onnx.helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
    model.graph.initializer.append(cond)
    model.graph.node.append(
        onnx.helper.make_node("If", ["cond"], ["y2"], then_branch=branch, else_branch=branch)
    )
    return model, "qnn"


BREAKERS = {
    # rule -> (model that breaks it, the target whose rule it breaks)
    "forbidden-op": lambda m, d: (quantize_dynamic(d[0], QuantConfig(**NEAREST)), "tensorrt"),
    "activation-type": lambda m, d: (m["ort-cpu"], "tensorrt"),
    "activation-zero-point": lambda m, d: _nonzero_activation_zero_point(m),
    "weight-type": lambda m, d: (
        quantize(d[0], d[1], QuantConfig(weight_type="uint8", **NEAREST)),
        "ort-cpu",
    ),
    "weight-bits": lambda m, d: (m["ort-x86-vnni"], "ort-cpu"),
    "per-channel-axis": lambda m, d: _wrong_per_channel_axis(m),
    "half-quantized": lambda m, d: _float_activation_into_quantized_conv(m),
    "bias": lambda m, d: _wrong_bias_scale(m),
    "residual-add": lambda m, d: _float_residual_input(m),
    "opset": lambda m, d: _old_opset(m),
    "control-flow": lambda m, d: _control_flow(m),
}


def test_every_rule_has_a_breaking_model():
    assert set(BREAKERS) == set(RULES)


@pytest.mark.parametrize("rule", sorted(BREAKERS))
def test_check_catches_each_broken_rule(rule, per_target, cnn_and_data):
    broken, target = BREAKERS[rule](per_target, cnn_and_data)
    violations = check_model(broken, target).violations
    assert rule in {v.rule for v in violations}, [v.describe() for v in violations]


def test_check_cli_exits_1_naming_the_node_and_0_when_clean(per_target, tmp_path):
    clean, dirty = tmp_path / "clean.onnx", tmp_path / "dirty.onnx"
    onnx.save(per_target["tensorrt"], clean)
    onnx.save(per_target["ort-cpu"], dirty)
    ok = CliRunner().invoke(main, ["check", str(clean), "--target", "tensorrt"])
    assert ok.exit_code == 0 and "meets every tensorrt rule" in ok.output
    bad = CliRunner().invoke(
        main, ["check", str(dirty), "--target", "tensorrt", "--json", str(tmp_path / "c.json")]
    )
    assert bad.exit_code == 1
    assert "conv1 (Conv): bias is quantized" in bad.output
    assert json.loads((tmp_path / "c.json").read_text())["ok"] is False
    missing = CliRunner().invoke(main, ["check", str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_a_stricter_target_rejects_full_8_bit_weights(per_target):
    """ort-x86-vnni's 8-bit weights break ort-cpu's rules; ort-cpu's 7-bit ones meet both."""
    assert not check_model(per_target["ort-x86-vnni"], "ort-cpu").ok
    assert check_model(per_target["ort-cpu"], "ort-x86-vnni").ok


def test_check_reads_a_path(tmp_path: Path, per_target):
    path = tmp_path / "m.onnx"
    onnx.save(per_target["qnn"], path)
    assert check_model(path, "qnn").path == str(path)


def test_compare_warns_only_for_8_bit_weights_on_a_cpu_without_vnni(
    per_target, cnn_and_data, tmp_path, monkeypatch
):
    import onnxq.evaluate
    from onnxq.evaluate import compare

    model, data = cnn_and_data
    paths = {}
    for name in ("ort-cpu", "ort-x86-vnni"):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(per_target[name], paths[name])
    onnx.save(model, tmp_path / "fp32.onnx")
    avx2 = CpuFeatures("x86_64", avx2=True, avx512=False, vnni=False)
    monkeypatch.setattr(onnxq.evaluate, "cpu_features", lambda: avx2)
    result = compare(
        tmp_path / "fp32.onnx",
        [paths["ort-cpu"], paths["ort-x86-vnni"]],
        data,
        latency_runs=2,
        warmup=1,
        measure_memory=False,
    )
    warnings = [note for note in result.notes if "no VNNI" in note]
    assert (
        len(warnings) == 1 and "ort-x86-vnni" in warnings[0] and "--target ort-cpu" in warnings[0]
    )


def test_inspect_warns_only_for_8_bit_weights_on_a_cpu_without_vnni(
    per_target, tmp_path, monkeypatch
):
    import onnxq.inspect

    outputs = {}
    for cpu in (
        CpuFeatures("x86_64", avx2=True, avx512=False, vnni=False),
        CpuFeatures("x86_64", avx2=True, avx512=True, vnni=True),
    ):
        monkeypatch.setattr(onnxq.inspect, "cpu_features", lambda cpu=cpu: cpu)
        for name in ("ort-cpu", "ort-x86-vnni"):
            path = tmp_path / f"{name}.onnx"
            onnx.save(per_target[name], path)
            result = CliRunner().invoke(main, ["inspect", str(path)])
            assert result.exit_code == 0, result.output
            outputs[cpu.vnni, name] = [
                line for line in result.output.splitlines() if line.startswith("warning:")
            ]
    assert outputs[False, "ort-cpu"] == outputs[True, "ort-cpu"] == []
    assert outputs[True, "ort-x86-vnni"] == []
    [warning] = outputs[False, "ort-x86-vnni"]
    assert "no VNNI" in warning and "--target ort-cpu" in warning
