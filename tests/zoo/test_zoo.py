"""Example models (``models/``) and data recipes (``calibration/``)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from calibration.digits import (  # noqa: E402
    NUM_IMAGES,
    load_digits_images,
    load_digits_splits,
    write_npz,
)
from calibration.images import (  # noqa: E402
    EVAL_WIDTH,
    SIZE,
    eval_inputs,
    photo_crops,
    resnet_inputs,
    warmup_inputs,
)
from models.digits_cnn import accuracy, build_digits_cnn, train_digits_cnn  # noqa: E402
from models.resnet import build_resnet18, warm_up_batchnorm  # noqa: E402
from onnxq.export import export_torch, load_factory  # noqa: E402


@pytest.fixture(scope="module")
def trained(splits):
    return train_digits_cnn(splits.train_x, splits.train_y, seed=0)


def test_digits_splits_are_disjoint_and_stratified(splits):
    idx = [splits.train_idx, splits.calib_idx, splits.test_idx]
    assert [len(i) for i in idx] == [NUM_IMAGES - 600, 200, 400]
    assert len(np.unique(np.concatenate(idx))) == NUM_IMAGES  # disjoint and covering
    images, labels = load_digits_images()
    assert np.array_equal(splits.calib_x, images[splits.calib_idx])
    assert np.array_equal(splits.test_y, labels[splits.test_idx])
    assert splits.train_x.dtype == np.float32 and splits.train_x.shape[1:] == (1, 8, 8)
    assert splits.train_x.min() >= 0.0 and splits.train_x.max() <= 1.0
    assert np.bincount(splits.test_y, minlength=10).min() >= 38  # every class ~40 times
    again = load_digits_splits(seed=0)
    assert np.array_equal(again.calib_idx, splits.calib_idx)


def test_digits_cnn_reaches_97_percent(splits, trained):
    assert accuracy(trained, splits.test_x, splits.test_y) >= 0.97
    assert not trained.training


def test_trained_digits_cnn_exports_with_the_same_accuracy(tmp_path, splits, trained):
    result = export_torch(trained, torch.from_numpy(splits.calib_x[:4]), tmp_path / "d.onnx")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": splits.test_x})
    ort_accuracy = float((logits.argmax(1) == splits.test_y).mean())
    assert ort_accuracy == accuracy(trained, splits.test_x, splits.test_y)


def test_write_npz(tmp_path, splits):
    path = write_npz(tmp_path / "calib.npz", splits.calib_x, input_name="input")
    with np.load(path) as data:
        assert list(data) == ["input"]
        assert np.array_equal(data["input"], splits.calib_x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


def test_build_digits_cnn_is_seeded():
    a, b = build_digits_cnn(seed=3), build_digits_cnn(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_resnet18_shape_and_size():
    model = build_resnet18()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's ResNet-18
    with torch.no_grad():
        out = model(torch.from_numpy(resnet_inputs(2)))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_warm_up_batchnorm_sets_cumulative_average():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3))
    batches = [torch.randn(4, 3, 5, 5, generator=gen) * s + s for s in (1.0, 2.0, 3.0)]
    warm_up_batchnorm(model, batches)
    norm = model[0]
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(norm.running_mean, means, atol=1e-5)
    assert norm.momentum == 0.3 and not model.training
    assert int(norm.num_batches_tracked) == 3
    with pytest.raises(ValueError, match="at least one batch"):
        warm_up_batchnorm(model, [])


def test_photo_crops_are_deterministic_normalised_and_split_by_columns():
    x = resnet_inputs(6)
    assert x.shape == (6, 3, SIZE, SIZE) and x.dtype == np.float32
    assert np.array_equal(x, resnet_inputs(6))
    assert not np.array_equal(x, resnet_inputs(6, seed=1))
    assert abs(float(x.mean())) < 0.8 and 0.5 < float(x.std()) < 1.5
    assert not np.array_equal(warmup_inputs(4), resnet_inputs(4))
    assert eval_inputs(3).shape == (3, 3, SIZE, SIZE)
    # eval crops only ever touch the right EVAL_WIDTH columns, which others never reach
    assert 640 - EVAL_WIDTH >= SIZE
    with pytest.raises(ValueError, match="split"):
        photo_crops("test", 2)


def test_wide_calibration_crops_cycle_through_eight_photos():
    pytest.importorskip("skimage")
    from calibration.images import EXTRA_PHOTOS, wide_calibration_crops

    x = wide_calibration_crops(16)
    assert x.shape == (16, 3, SIZE, SIZE) and x.dtype == np.float32
    assert np.array_equal(x, wide_calibration_crops(16))
    assert abs(float(x.mean())) < 0.8 and 0.5 < float(x.std()) < 1.5
    sources = 2 + len(EXTRA_PHOTOS)
    colours = x.mean(axis=(2, 3))[:sources]  # one crop of each photo: eight different scenes
    assert (
        min(np.abs(colours[i] - colours[j]).max() for i in range(sources) for j in range(i)) > 0.05
    )


@pytest.mark.slow
def test_resnet18_factory_exports(tmp_path):
    module, example = load_factory("models.resnet:resnet18_factory")
    assert example.shape == (1, 3, 224, 224)
    assert module.bn1.running_var.mean() != 1.0  # warmed up, not the init value
    result = export_torch(module, example, tmp_path / "r18.onnx")
    assert result.max_abs_error < 1e-4
