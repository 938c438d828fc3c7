"""The LSTM digits classifier (``models/lstm.py``): accuracy, export, ONNX Runtime agreement."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from models.lstm import (  # noqa: E402
    HIDDEN,
    DigitsLSTM,
    accuracy,
    as_sequences,
    build_lstm,
    train_lstm,
)
from onnxq.export import export_torch  # noqa: E402


@pytest.fixture(scope="module")
def trained(splits):
    return train_lstm(splits.train_x, splits.train_y, seed=0)


def test_as_sequences_reads_rows_as_time_steps(splits):
    seq = as_sequences(splits.test_x[:5])
    assert seq.shape == (5, 8, 8) and seq.dtype == np.float32
    assert np.array_equal(seq[2, 3], splits.test_x[2, 0, 3])  # step 3 is pixel row 3
    assert as_sequences(seq) is not None and np.array_equal(as_sequences(seq), seq)
    with pytest.raises(ValueError, match="expected images"):
        as_sequences(np.zeros((2, 3, 8, 8)))


def test_lstm_reaches_95_percent(splits, trained):
    assert isinstance(trained, DigitsLSTM) and not trained.training
    assert trained.lstm.hidden_size == HIDDEN and trained.lstm.num_layers == 2
    assert accuracy(trained, splits.test_x, splits.test_y) >= 0.95


def test_build_lstm_is_seeded():
    a, b = build_lstm(seed=5), build_lstm(seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a(torch.zeros(3, 8, 8)).shape == (3, 10)


# torch's generic note on LSTM export; the doubled-batch check in export_torch covers it
@pytest.mark.filterwarnings("ignore:Exporting a model to ONNX with a batch_size")
def test_exported_lstm_agrees_with_torch(tmp_path, splits, trained):
    example = torch.from_numpy(as_sequences(splits.calib_x[:1]))
    result = export_torch(trained, example, tmp_path / "lstm.onnx")
    assert result.max_abs_error < 1e-4
    model = onnx.load(result.path)
    assert [i.name for i in model.graph.input] == ["input"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert "LSTM" in {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    test = as_sequences(splits.test_x)
    (logits,) = session.run(None, {"input": test})
    with torch.no_grad():
        expected = trained(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-3)
    assert float((logits.argmax(1) == splits.test_y).mean()) >= 0.95
