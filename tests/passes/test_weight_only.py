"""Weight-only mode: blocked DequantizeLinear on MatMul weights, fused by ONNX Runtime into
MatMulNBits; the blocked arithmetic checked against ONNX's reference evaluator."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from onnx.parser import parse_model
from onnx.reference import ReferenceEvaluator
from support import optimized_op_counts, sqnr_db

from onnxq import quantize_weight_only
from onnxq.blockwise import block_qparams, dequantize_blocks, quantize_blocks
from onnxq.cli import main
from onnxq.config import QuantConfig, QuantType
from onnxq.errors import ConfigError, UnsupportedModelError
from onnxq.inspect import inspect_model
from onnxq.weight_only import quantize_weight_only_with_report

TYPES = ("uint4", "int4", "uint8", "int8")


def _mlp(rng: np.random.Generator, k: int = 100, hidden: int = 48, opset: int = 17):
    """x[N, k] -> MatMul(w1) -> Sigmoid -> Gemm(w2^T, b2, transB=1) -> y[N, 16]; K = 100 is
    not a multiple of any block size, so the last block of w1 is short."""
    model = parse_model(
        f"""<ir_version: 8, opset_import: ["": {opset}]>
        mlp (float[N, {k}] x) => (float[N, 16] y) {{
            h = MatMul(x, w1)
            s = Sigmoid(h)
            y = Gemm<transB = 1>(s, w2, b2)
        }}"""
    )
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((k, hidden)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((16, hidden)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b2"),
        ]
    )
    onnx.checker.check_model(model)
    return model


def _session(model: onnx.ModelProto, accuracy_level: str | None = None):
    options = ort.SessionOptions()
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# -- blocked qparams (numpy) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qtype", "bounds"),
    [("int4", (-7, 7)), ("uint4", (0, 15)), ("int8", (-127, 127)), ("uint8", (0, 255))],
)
def test_blocks_use_their_own_range_and_round_to_the_nearest_level(qtype, bounds, rng):
    weight = rng.standard_normal((100, 24)).astype(np.float32)
    weight[40] = 100.0  # an outlier row widens block 1 only
    qtype = QuantType(qtype)
    qp = block_qparams(weight, qtype, 32, symmetric=qtype.signed)
    assert qp.scale.shape == qp.zero_point.shape == (4, 24) and qp.bounds == bounds
    assert np.all(qp.scale[1] > 10 * qp.scale[0])
    q = quantize_blocks(weight, qp)
    assert q.min() >= bounds[0] and q.max() <= bounds[1]
    error = np.abs(dequantize_blocks(q, qp) - weight)
    step = qp.scale[np.arange(100) // 32]
    assert np.all(error <= step * (0.5 + 1e-6))  # min-max ranges: nothing is clipped
    if qtype.signed:
        assert not np.any(qp.zero_point)


def test_last_short_block_takes_its_range_from_its_own_rows(rng):
    weight = rng.uniform(-1, 1, (40, 8)).astype(np.float32)
    weight[32:] *= 0.01  # the last block (rows 32..39) is small
    qp = block_qparams(weight, QuantType.INT4, 32, symmetric=True)
    np.testing.assert_allclose(qp.scale[1], np.abs(weight[32:]).max(axis=0) / 7, rtol=1e-6)


# -- the rewrite, against the reference evaluator -----------------------------------------------


@pytest.mark.parametrize("weight_type", TYPES)
def test_blocked_dequantize_matches_the_reference_evaluator(weight_type, rng):
    model = _mlp(rng)
    config = QuantConfig(weight_type=weight_type, block_size=32)
    out = quantize_weight_only(model, config)
    assert out.opset_import[0].version == 21
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2
    signed = QuantType(weight_type).signed
    assert all(len(n.input) == (2 if signed else 3) for n in dqs)  # zero points: unsigned only
    inits = _initializers(out)
    x = rng.standard_normal((8, 100)).astype(np.float32)
    # w1 by hand: (q - zp) * scale[k // 32], the blocked DequantizeLinear of opset 21
    q = inits["w1_quantized"].astype(np.int32)
    zero = inits.get("w1_zero_point", np.zeros_like(q[:4])).astype(np.int32)
    by_hand = (q - zero[np.arange(100) // 32]) * inits["w1_scale"][np.arange(100) // 32]
    reference = ReferenceEvaluator(out)
    h = reference.run(["h"], {"x": x})[0]
    np.testing.assert_allclose(h, x @ by_hand.astype(np.float32), rtol=1e-5, atol=1e-5)
    # ONNX Runtime (fused, activations kept float) computes what the reference does
    expected = reference.run(None, {"x": x})[0]
    got = _session(out, accuracy_level="0").run(None, {"x": x})[0]
    assert sqnr_db(expected, got) > 80
    floor = 15 if QuantType(weight_type).bits == 4 else 38
    assert sqnr_db(ReferenceEvaluator(model).run(None, {"x": x})[0], expected) > floor


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("weight_type", TYPES)
def test_every_weight_matmul_fuses_into_matmulnbits(weight_type, block_size, rng, tmp_path):
    out = quantize_weight_only(
        _mlp(rng), QuantConfig(weight_type=weight_type, block_size=block_size)
    )
    counts = optimized_op_counts(out, tmp_path)
    assert counts.get("MatMulNBits") == 2
    assert "DequantizeLinear" not in counts and "MatMul" not in counts and "Gemm" not in counts


def test_inspect_counts_matmulnbits_as_the_matmul_kernel(rng, tmp_path):
    path = tmp_path / "int4.onnx"
    onnx.save(quantize_weight_only(_mlp(rng)), path)
    families = {f.family: f for f in inspect_model(path).families}
    assert families["MatMul"].int8 == {"MatMulNBits": 2}
    assert not families["MatMul"].float_ops


def test_gemm_becomes_matmul_and_add_with_its_output_name(rng):
    model = _mlp(rng)
    result = quantize_weight_only_with_report(model, QuantConfig(weight_type="uint8"))
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert not any(n.op_type == "Gemm" for n in result.model.graph.node)
    assert {d.op_type: d.quantized for d in result.report.decisions} == {
        "MatMul": True,
        "Gemm": True,
    }
    x = rng.standard_normal((16, 100)).astype(np.float32)
    assert (
        sqnr_db(
            _session(model).run(None, {"x": x})[0], _session(result.model).run(None, {"x": x})[0]
        )
        > 35
    )


def test_what_stays_float_says_why(rng):
    model = parse_model(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 32] x, float[32, 32] live) => (float[N, 32] y, float[N, 32] z, float[N, 32] t)
        {
            a = MatMul(x, live)
            b = MatMul(a, shared)
            y = MatMul(b, shared)
            z = Gemm<alpha = 0.5>(a, w)
            t = MatMul(a, kept)
        }"""
    )
    for name in ("shared", "w", "kept"):
        array = rng.standard_normal((32, 32)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    model.graph.node[4].name = "keep_me"
    config = QuantConfig(exclude_nodes=("keep",))
    reasons = [d.reason for d in quantize_weight_only_with_report(model, config).report.decisions]
    assert reasons == [
        "no constant weight (activation x activation)",
        "weight shared with other nodes",
        "weight shared with other nodes",
        "Gemm with transA or alpha/beta != 1",
        "excluded by name pattern 'keep'",
    ]


def test_embedding_tables_are_int8_per_row_as_in_the_other_modes(rng):
    model = parse_model(
        """<ir_version: 8, opset_import: ["": 17]>
        g (int64[N, 8] ids) => (float[N, 8, 32] y) {
            e = Gather(table, ids)
            y = MatMul(e, w)
        }"""
    )
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((500, 64)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w"),
        ]
    )
    result = quantize_weight_only_with_report(model)
    ops = {d.op_type: d.reason for d in result.report.decisions if d.quantized}
    assert ops["Gather"] == "int8 embedding table (per-row scales)"
    assert ops["MatMul"].startswith("blocked uint4")
    assert _initializers(result.model)["table_quantized"].dtype == np.int8


def test_gptq_lowers_the_output_error_on_the_calibration_inputs(rng):
    model = _mlp(rng, k=128, hidden=64)
    # correlated inputs, as real activations are: GPTQ has something to compensate with
    mixing = rng.standard_normal((128, 128)).astype(np.float32) * 0.3 + np.eye(
        128, dtype=np.float32
    )
    x = (0.1 * rng.standard_normal((256, 128)).astype(np.float32) @ mixing).astype(np.float32)
    reference = ReferenceEvaluator(model).run(["h"], {"x": x})[0]
    errors = {}
    for rounding in ("nearest", "gptq"):
        config = QuantConfig(weight_type="int4", weight_rounding=rounding)
        result = quantize_weight_only_with_report(model, config, calibration_data={"x": x})
        errors[rounding] = sqnr_db(
            reference, ReferenceEvaluator(result.model).run(["h"], {"x": x})[0]
        )
        expected = "GPTQ" if rounding == "gptq" else "nearest"
        assert expected in result.report.decisions[0].reason
    assert result.report.samples == 256
    assert errors["gptq"] > errors["nearest"] + 2.0  # 23.7 dB vs 20.4 dB


def test_without_data_weights_round_to_nearest_and_the_report_says_so(rng):
    result = quantize_weight_only_with_report(_mlp(rng))
    assert result.report.config["weight_rounding"] == "nearest"
    assert result.report.config["mode"] == "weight-only"
    assert any("no calibration data" in note for note in result.report.notes)


def test_mode_target_and_scheme_are_recorded(rng):
    config = QuantConfig(target="openvino", weight_type="int4", block_size=64)
    result = quantize_weight_only_with_report(_mlp(rng), config)
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["onnxq.mode"] == "weight-only" and meta["onnxq.target"] == "openvino"
    assert json.loads(meta["onnxq.scheme"]) == {
        "target": "openvino",
        "mode": "weight-only",
        "activation_type": "float",
        "weight_type": "int4",
        "weight_symmetric": True,
        "weight_bits": 4,
        "block_size": 64,
    }
    assert result.report.target["name"] == "openvino"
    assert result.report.size_after < 0.3 * result.report.size_before


# -- bad input: one typed line -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target": "tensorrt"}, "target tensorrt supports --mode static, not weight-only"),
        ({"target": "qnn"}, "target qnn supports --mode static, not weight-only"),
        ({"weight_type": "uint16"}, "weight-only mode writes int4, int8, uint4, uint8 weights"),
        ({"reduce_range": True}, "reduce_range does not apply"),
        ({"op_types": ("Conv",)}, "weight-only mode has no rule for Conv"),
    ],
)
def test_configs_weight_only_cannot_write_are_refused(changes, message, rng):
    with pytest.raises(ConfigError, match=message):
        quantize_weight_only(_mlp(rng), QuantConfig(**changes))


@pytest.mark.parametrize("block_size", [8, 48, 0])
def test_block_sizes_onnx_runtime_does_not_fuse_are_refused(block_size):
    with pytest.raises(ConfigError, match="block_size must be a power of two >= 16"):
        QuantConfig(block_size=block_size)


def test_four_bit_weights_are_refused_outside_weight_only(rng):
    from onnxq import quantize_dynamic

    with pytest.raises(ConfigError, match="int4 weights are written by --mode weight-only"):
        quantize_dynamic(_mlp(rng), QuantConfig(weight_type="int4"))


def test_a_model_that_cannot_reach_opset_21_is_refused_with_the_reason(rng, monkeypatch):
    def fail(model, target):
        raise RuntimeError("no adapter for op Foo")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    with pytest.raises(UnsupportedModelError, match=r"needs opset 21: cannot upgrade .* 17 to 21"):
        quantize_weight_only(_mlp(rng))


def test_an_already_quantized_model_is_refused(rng):
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        quantize_weight_only(quantize_weight_only(_mlp(rng)))


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_writes_the_model_and_a_summary(rng, tmp_path):
    model, out, summary = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "s.json"
    onnx.save(_mlp(rng), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 100)).astype(np.float32))
    args = ["quantize", str(model), "-o", str(out), "--mode", "weight-only", "--weight-type"]
    args += ["int4", "--block-size", "64", "--calib", str(calib), "--summary-json", str(summary)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "weights int4 in blocks of 64 along K" in result.output
    assert "GPTQ Hessians from 16 samples" in result.output
    assert json.loads(summary.read_text())["config"]["mode"] == "weight-only"
    assert onnx.load(out).opset_import[0].version == 21


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--block-size", "24"], "error: block_size must be a power of two >= 16, got 24"),
        (["--target", "tensorrt"], "error: target tensorrt supports --mode static"),
        (["--ranges", "r.json"], "error: --ranges applies to static mode only"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_no_file(extra, message, rng, tmp_path):
    model, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_mlp(rng), model)
    args = ["quantize", str(model), "-o", str(out), "--mode", "weight-only", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)
    assert not out.exists()
