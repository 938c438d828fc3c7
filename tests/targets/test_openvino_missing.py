"""Without the ``openvino`` package, asking OpenVINO is a one-line error naming the extra."""

from __future__ import annotations

import sys

import pytest

from onnxq.errors import OnnxqError
from onnxq.targets.openvino import OpenVINONotInstalledError, runtime_precisions


def test_missing_openvino_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(OpenVINONotInstalledError) as caught:
        runtime_precisions(tmp_path / "model.onnx")
    assert isinstance(caught.value, OnnxqError)
    assert str(caught.value) == 'OpenVINO is not installed: pip install "onnxq[openvino]"'
