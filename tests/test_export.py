"""export_torch: both exporters, dynamic batch, verification against torch, atomic output."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from models.digits_cnn import build_digits_cnn  # noqa: E402
from onnxq.errors import ConfigError, ExportError, OutputPathError  # noqa: E402
from onnxq.export import ExportResult, compare_outputs, export_torch, load_factory  # noqa: E402

EXPORTERS = ["torchscript", "dynamo"]


class TwoInTwoOut(torch.nn.Module):
    """Two inputs of different widths, two outputs (one 1-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(a) + b.mean(dim=1, keepdim=True), torch.relu(a).sum(dim=-1)


class PythonState(torch.nn.Module):
    """Python state baked into the graph at export: ONNX adds a different constant than torch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + float(self.calls)


class BakedBatch(torch.nn.Module):
    """Reads the batch size as a Python int: correct only at the traced batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(int(x.shape[0]), -1) * 2.0


class DataDependent(torch.nn.Module):
    """Python control flow on a tensor value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1


class Unsupported(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.T)[0]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _ort_run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_digits_cnn_exports_with_dynamic_batch(tmp_path, exporter):
    model = build_digits_cnn().train()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = export_torch(model, x, tmp_path / "cnn.onnx", exporter=exporter)

    assert isinstance(result, ExportResult)
    assert result.path == tmp_path / "cnn.onnx" and result.path.is_file()
    assert result.tolerance == (1e-3, 1e-4)
    assert 0.0 <= result.max_abs_error < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]
    # training flags restored on every submodule
    assert model.training and all(m.training for m in model.modules())

    proto = onnx.load(result.path)
    onnx.checker.check_model(proto)
    assert result.opset == {"torchscript": 17, "dynamo": 18}[exporter]
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert _dims(proto.graph.input[0]) == ["batch", 1, 8, 8]
    assert _dims(proto.graph.output[0]) == ["batch", 10]

    batch = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    (got,) = _ort_run(result.path, {"input": batch.numpy()})
    with torch.no_grad():
        want = model.eval()(batch).numpy()
    error, ok = compare_outputs(got, want, rtol=1e-3, atol=1e-4)
    assert ok and error < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_multi_input_multi_output(tmp_path, exporter):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, generator=gen), torch.randn(2, 5, generator=gen)
    result = export_torch(TwoInTwoOut(), (a, b), tmp_path / "m.onnx", exporter=exporter)
    proto = onnx.load(result.path)
    assert [i.name for i in proto.graph.input] == ["input", "input_1"]
    assert [o.name for o in proto.graph.output] == ["output", "output_1"]
    assert [_dims(v)[0] for v in [*proto.graph.input, *proto.graph.output]] == ["batch"] * 4
    assert result.max_abs_error < 1e-5


def test_custom_names_and_static_batch(tmp_path):
    a, b = torch.ones(2, 4), torch.ones(2, 5)
    result = export_torch(
        TwoInTwoOut(),
        (a, b),
        tmp_path / "m.onnx",
        input_names=["a", "b"],
        output_names=["y", "s"],
        dynamic_batch=False,
    )
    proto = onnx.load(result.path)
    assert [i.name for i in proto.graph.input] == ["a", "b"]
    assert [o.name for o in proto.graph.output] == ["y", "s"]
    assert _dims(proto.graph.input[0]) == [2, 4]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mismatch_with_torch_raises_and_writes_nothing(tmp_path, exporter):
    message = r"output 'output' at batch 2 differs by up to [\d.]+ \(tolerance atol=0.0001 \+"
    with pytest.raises(ExportError, match=message):
        export_torch(PythonState(), torch.zeros(2, 3), tmp_path / "m.onnx", exporter=exporter)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("exporter", "message"),
    [
        ("torchscript", r"at batch 4 \(dynamic batch check\): ONNX Runtime shape \[2, 12\]"),
        ("dynamo", r"fixed axis 0 of input 'input' to 2"),
    ],
)
def test_batch_baked_into_the_graph_is_caught(tmp_path, exporter, message):
    with pytest.raises(ExportError, match=message):
        export_torch(BakedBatch(), torch.ones(2, 3, 2), tmp_path / "m.onnx", exporter=exporter)
    assert list(tmp_path.iterdir()) == []


def test_static_batch_export_of_a_batch_baking_module(tmp_path):
    # without a dynamic batch the traced graph is correct
    target = tmp_path / "m.onnx"
    result = export_torch(BakedBatch(), torch.ones(2, 3, 2), target, dynamic_batch=False)
    assert result.max_abs_error == 0.0


def test_module_failing_at_the_doubled_batch(tmp_path):
    class FixedBatch(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, 3)

    with pytest.raises(ExportError, match="fails on the doubled example batch"):
        export_torch(FixedBatch(), torch.ones(2, 3), tmp_path / "m.onnx")
    assert export_torch(FixedBatch(), torch.ones(2, 3), tmp_path / "m.onnx", dynamic_batch=False)


def test_exporter_failure_is_one_line_export_error(tmp_path):
    with pytest.raises(ExportError, match="linalg_eigh") as info:
        export_torch(Unsupported(), torch.eye(3), tmp_path / "m.onnx", dynamic_batch=False)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_dynamo_failure_is_one_line_export_error(tmp_path):
    with pytest.raises(ExportError, match=r"\(dynamo\) failed: GuardOnDataDependent") as info:
        export_torch(DataDependent(), torch.ones(2, 3), tmp_path / "m.onnx", exporter="dynamo")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder(tmp_path):
    target = tmp_path / "nope" / "m.onnx"
    with pytest.raises(OutputPathError, match="does not exist"):
        export_torch(build_digits_cnn(), torch.zeros(1, 1, 8, 8), target)
    assert not target.parent.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exporter": "onnx"}, "unknown exporter"),
        ({"exporter": "dynamo", "opset": 17}, "opset >= 18"),
        ({"opset": 3}, "opset must be"),
        ({"rtol": -1.0}, "rtol"),
        ({"atol": math.nan}, "atol"),
        ({"input_names": ["a", "b"]}, "2 input names for 1 inputs"),
        ({"output_names": ["y", "y2"]}, "2 output names for 1 outputs"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        export_torch(build_digits_cnn(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_example_inputs(tmp_path):
    with pytest.raises(ConfigError, match="tensor"):
        export_torch(build_digits_cnn(), np.zeros((1, 1, 8, 8)), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="scalar"):
        export_torch(torch.nn.Identity(), torch.tensor(1.0), tmp_path / "m.onnx")


# compare_outputs boundary table: (actual, expected, rtol, atol, ok)
COMPARE_CASES = [
    ([1.0], [1.0], 0.0, 0.0, True),
    ([1.5], [1.0], 0.0, 0.5, True),  # exactly on the bound
    ([1.5 + 1e-9], [1.0], 0.0, 0.5, False),
    ([11.0], [10.0], 0.1, 0.0, True),  # rtol scales with |torch|
    ([-11.0], [-10.0], 0.1, 0.0, True),
    ([-11.5], [-10.0], 0.1, 0.0, False),
    ([np.nan], [np.nan], 0.0, 0.0, True),
    ([np.nan], [1.0], 1.0, 1.0, False),
    ([np.inf], [np.inf], 0.0, 0.0, True),
    ([np.inf], [-np.inf], 1.0, 1.0, False),
    ([1.0, 2.0], [1.0], 1.0, 1.0, False),  # shape mismatch
]


@pytest.mark.parametrize(("actual", "expected", "rtol", "atol", "ok"), COMPARE_CASES)
def test_compare_outputs_boundaries(actual, expected, rtol, atol, ok):
    _, within = compare_outputs(np.array(actual), np.array(expected), rtol=rtol, atol=atol)
    assert within is ok


def test_compare_outputs_reports_worst_error():
    actual, expected = np.array([1.0, 2.5, 3.0]), np.array([1.0, 2.0, 3.25])
    worst, ok = compare_outputs(actual, expected, rtol=0, atol=1)
    assert worst == 0.5 and ok


def test_load_factory_module_and_tuple(tmp_path, monkeypatch):
    assert isinstance(load_factory("models.digits_cnn:build_digits_cnn"), torch.nn.Module)
    (tmp_path / "local_zoo_factory.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                return torch.nn.Linear(2, 2), torch.zeros(1, 2)

            class Holder:
                build = staticmethod(make)
            """
        )
    )
    monkeypatch.chdir(tmp_path)  # the current folder is searched
    module, example = load_factory("local_zoo_factory:Holder.build")
    assert isinstance(module, torch.nn.Linear) and example.shape == (1, 2)
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("models.digits_cnn", "bad factory spec"),
        ("models.digits_cnn:", "bad factory spec"),
        ("a b:c", "bad factory spec"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("models.digits_cnn:no_such_factory", "has no attribute 'no_such_factory'"),
        ("models.digits_cnn:NUM_CLASSES", "not callable"),
        ("models.digits_cnn:accuracy", "raised TypeError"),
        ("math:pi", "not callable"),
        ("os:getcwd", "expected a torch.nn.Module"),
    ],
)
def test_load_factory_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_factory(spec)
    assert "\n" not in str(info.value)


def test_import_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
        import onnxq.export as ex
        from onnxq.errors import ExportError
        try:
            ex.export_torch(object(), None, "x.onnx")
        except ExportError as exc:
            print(exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "torch is not installed: pip install 'onnxq[torch]'"


class TokenPooler(torch.nn.Module):
    """Embedding, masked mean over the sequence: a batch and a sequence axis."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()
        return (self.embed(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class BakedSequence(TokenPooler):
    """Reads the sequence length as a Python int."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(ids.reshape(-1, int(ids.shape[1])), mask)


def _tokens(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 50, (batch, seq), generator=generator)
    mask = torch.arange(seq)[None] < torch.randint(1, seq + 1, (batch, 1), generator=generator)
    return ids, mask.long()


SEQUENCE_AXES = {"ids": {1: "sequence"}, "mask": {1: "sequence"}}


def _export_tokens(module, path, axes=SEQUENCE_AXES, **options) -> ExportResult:
    """``module`` exported from a ``[2, 10]`` token batch with inputs ``ids`` and ``mask``."""
    return export_torch(
        module, _tokens(2, 10), path, input_names=["ids", "mask"], dynamic_axes=axes, **options
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_extra_dynamic_axes_are_symbolic_and_checked(tmp_path, exporter):
    target = tmp_path / "pool.onnx"
    _export_tokens(TokenPooler(), target, exporter=exporter)
    model = onnx.load(target)
    assert [_dims(i) for i in model.graph.input] == [["batch", "sequence"]] * 2
    ids, mask = _tokens(3, 17)  # another batch and length than traced
    (got,) = _ort_run(target, {"ids": ids.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, TokenPooler()(ids, mask).numpy(), rtol=1e-5, atol=1e-6)


def test_baked_sequence_length_fails_the_halved_check(tmp_path):
    with pytest.raises(ExportError, match="'sequence' halved"):
        _export_tokens(BakedSequence(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"nope": {1: "s"}}, "not an input"),
        ({"ids": {2: "s"}}, "must be in 1..1"),
        ({"ids": {1: "batch"}}, "not named 'batch'"),
    ],
)
def test_bad_dynamic_axes_are_config_errors(tmp_path, axes, message):
    with pytest.raises(ConfigError, match=message):
        _export_tokens(TokenPooler(), tmp_path / "m.onnx", axes)


def token_pooler_factory() -> tuple[TokenPooler, tuple[torch.Tensor, torch.Tensor]]:
    """For the CLI test below: ``onnxq export test_export:token_pooler_factory``."""
    return TokenPooler(), _tokens(2, 10)


def test_cli_export_with_a_sequence_axis_and_the_exporters_default_opset(tmp_path):
    from click.testing import CliRunner

    from onnxq.cli import main

    out = tmp_path / "pool.onnx"
    args = ["export", "test_export:token_pooler_factory", "-o", str(out), "--exporter", "dynamo"]
    axes = ["--dynamic-axis", "input:1:sequence", "--dynamic-axis", "input_1:1:sequence"]
    result = CliRunner().invoke(main, args + axes)
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    assert [_dims(i) for i in model.graph.input] == [["batch", "sequence"]] * 2
    assert next(o.version for o in model.opset_import if o.domain == "") == 18
    bad = CliRunner().invoke(
        main, [*args[:3], str(tmp_path / "x.onnx"), "--dynamic-axis", "input:one:s"]
    )
    assert bad.exit_code == 2 and "INPUT:AXIS:NAME" in bad.output
