"""Per-channel MSE weight ranges: never worse than min-max, clip outliers, wired by config."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.calibration import weight_ranges
from onnxq.calibration.weight_ranges import mse_weight_qparams, weight_qparams_for
from onnxq.config import QuantConfig, QuantType, WeightRange
from onnxq.pipeline import quantize
from onnxq.qparams import dequantize, weight_qparams
from onnxq.qparams import quantize as quantize_levels


def _channel_errors(weight: np.ndarray, qp, axis: int) -> np.ndarray:
    error = (weight - dequantize(quantize_levels(weight, qp), qp)) ** 2
    return error.sum(axis=tuple(i for i in range(weight.ndim) if i != axis))


@pytest.mark.parametrize(("qtype", "symmetric"), [(QuantType.INT8, True), (QuantType.UINT8, False)])
def test_mse_is_never_worse_than_minmax_per_channel(rng, qtype, symmetric):
    """Channel 1: 200k N(0, 1) values and one at 10. Rounding all of them on the min-max grid
    costs more than clipping the one (``200k s**2 / 12`` against ``(10 - T)**2``)."""
    weight = rng.standard_normal((3, 200_000)).astype(np.float32)
    weight[1, 7] = 10.0
    minmax = weight_qparams(weight, qtype, axis=0, symmetric=symmetric)
    mse = mse_weight_qparams(weight, qtype, axis=0, symmetric=symmetric)
    assert mse.axis == 0 and mse.scale.shape == (3,)
    assert np.all(_channel_errors(weight, mse, 0) <= _channel_errors(weight, minmax, 0))
    assert mse.scale[1] < 0.9 * minmax.scale[1]  # the outlier is clipped


def test_reduce_range_clips_within_seven_bits(rng):
    weight = rng.standard_normal((3, 200_000)).astype(np.float32)
    weight[1, 7] = 10.0
    kwargs = {"axis": 0, "symmetric": True, "reduce_range": True}
    mse = mse_weight_qparams(weight, QuantType.INT8, **kwargs)
    minmax = weight_qparams(weight, QuantType.INT8, **kwargs)
    assert mse.scale[1] < 0.9 * minmax.scale[1]  # the outlier is clipped ...
    levels = quantize_levels(weight, mse)
    assert levels.min() >= -63 and levels.max() <= 63  # ... at the 7-bit bounds, not beyond
    assert levels[1, 7] == 63


def test_mse_keeps_minmax_where_nothing_is_gained():
    """Weights already on a grid whose ends are the channel extremes: min-max is exact."""
    weight = (np.arange(-127, 128, dtype=np.float32) * 0.01).reshape(1, -1)
    mse = mse_weight_qparams(weight, QuantType.INT8, axis=0, symmetric=True)
    minmax = weight_qparams(weight, QuantType.INT8, axis=0, symmetric=True)
    assert np.array_equal(mse.scale, minmax.scale)


def test_per_tensor_and_dispatch(rng):
    weight = rng.standard_normal((8, 5)).astype(np.float32)
    qp = mse_weight_qparams(weight, QuantType.INT8, axis=None, symmetric=True)
    assert qp.axis is None and qp.scale.shape == ()
    assert weight_qparams_for(WeightRange.MSE) is mse_weight_qparams
    assert weight_qparams_for(WeightRange.MINMAX) is weight_qparams


def test_config_weight_range_mse_reaches_the_weights(cnn, cnn_calib, monkeypatch):
    calls = []

    def spy(weight, qtype, **kwargs):
        calls.append(weight.shape)
        return mse_weight_qparams(weight, qtype, **kwargs)

    monkeypatch.setattr(weight_ranges, "mse_weight_qparams", spy)
    config = QuantConfig(weight_rounding="nearest", weight_range="mse")
    quantize(cnn, cnn_calib, config)
    assert (8, 3, 3, 3) in calls and (10, 16) in calls  # conv1 and fc weights
    calls.clear()
    quantize(cnn, cnn_calib, config.replace(weight_range="minmax"))
    assert not calls
