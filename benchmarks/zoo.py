"""The zoo models as benchmark inputs: fp32 ONNX, calibration and evaluation data, torch weights.

``prepare(name, folder, sizes)`` trains or loads the model, exports it once (verified against
torch by ``export_torch`` / ``export_minilm``) and writes, under ``folder``: ``fp32.onnx``,
``calib.npz`` and ``eval.npz`` (feed dicts, samples on axis 0), ``labels.npy`` where there are
labels, and ``torch_state.pt`` (the trained weights, for the PyTorch rows). ``torch_module``
rebuilds the float PyTorch module in another process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODELS: tuple[str, ...] = ("digits", "resnet", "lstm", "minilm")
METRICS = {"digits": "top1", "lstm": "top1", "resnet": "sqnr", "minilm": "cosine"}
# What the model is, for PyTorch's int8 (static FX for CNNs, dynamic for LSTM/Linear models).
KINDS = {"digits": "cnn", "resnet": "cnn", "lstm": "rnn", "minilm": "transformer"}


@dataclass(frozen=True)
class Sizes:
    """How much data and how many timed runs one model gets."""

    calib: int
    eval: int
    eval_batch: int
    latency_runs: int
    warmup: int


FULL: dict[str, Sizes] = {
    "digits": Sizes(calib=200, eval=400, eval_batch=100, latency_runs=500, warmup=50),
    "lstm": Sizes(calib=200, eval=400, eval_batch=100, latency_runs=500, warmup=50),
    "resnet": Sizes(calib=64, eval=64, eval_batch=8, latency_runs=100, warmup=10),
    "minilm": Sizes(calib=128, eval=300, eval_batch=1, latency_runs=300, warmup=20),
}
QUICK: dict[str, Sizes] = {
    "digits": Sizes(calib=32, eval=64, eval_batch=32, latency_runs=10, warmup=2),
    "lstm": Sizes(calib=32, eval=64, eval_batch=32, latency_runs=10, warmup=2),
    "resnet": Sizes(calib=8, eval=8, eval_batch=4, latency_runs=5, warmup=1),
    "minilm": Sizes(calib=16, eval=20, eval_batch=1, latency_runs=10, warmup=2),
}


@dataclass(frozen=True)
class ZooModel:
    """One prepared model: its files and how it is measured."""

    name: str
    kind: str
    metric: str
    folder: Path
    sizes: Sizes
    description: str

    @property
    def fp32(self) -> Path:
        return self.folder / "fp32.onnx"

    @property
    def calib(self) -> Path:
        return self.folder / "calib.npz"

    @property
    def eval(self) -> Path:
        return self.folder / "eval.npz"

    @property
    def labels(self) -> Path | None:
        path = self.folder / "labels.npy"
        return path if path.is_file() else None

    @property
    def torch_state(self) -> Path:
        return self.folder / "torch_state.pt"


def prepare(name: str, folder: Path, sizes: Sizes) -> ZooModel:
    """Build, export and write the data of zoo model ``name`` into ``folder``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    folder.mkdir(parents=True, exist_ok=True)
    description = {
        "digits": _prepare_digits,
        "lstm": _prepare_lstm,
        "resnet": _prepare_resnet,
        "minilm": _prepare_minilm,
    }[name](folder, sizes)
    return ZooModel(name, KINDS[name], METRICS[name], folder, sizes, description)


def torch_module(name: str, state: Path) -> Any:
    """The float PyTorch module of zoo model ``name`` (weights from ``state`` where saved)."""
    import torch

    if name == "minilm":
        from models.minilm import load_encoder

        return load_encoder()
    if name == "digits":
        from models.digits_cnn import build_digits_cnn

        module = build_digits_cnn()
    elif name == "lstm":
        from models.lstm import build_lstm

        module = build_lstm()
    else:
        from models.resnet import build_resnet18

        module = build_resnet18()
    module.load_state_dict(torch.load(state, weights_only=True))
    return module.eval()


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    """A feed dict saved by ``prepare`` (every array has the samples on axis 0)."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def batches(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """``feeds`` cut into consecutive batches of ``size`` samples (the last may be smaller)."""
    total = len(next(iter(feeds.values())))
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, total, size)]


def _save(folder: Path, calib: dict[str, np.ndarray], evaluation: dict[str, np.ndarray]) -> None:
    np.savez(folder / "calib.npz", **calib)
    np.savez(folder / "eval.npz", **evaluation)


def _prepare_digits(folder: Path, sizes: Sizes) -> str:
    import torch

    from calibration.digits import load_digits_splits
    from models.digits_cnn import train_digits_cnn
    from onnxq.export import export_torch

    splits = load_digits_splits()
    model = train_digits_cnn(splits.train_x, splits.train_y)
    torch.save(model.state_dict(), folder / "torch_state.pt")
    export_torch(model, torch.from_numpy(splits.calib_x[:4]), folder / "fp32.onnx")
    _save(folder, {"input": splits.calib_x[: sizes.calib]}, {"input": splits.test_x[: sizes.eval]})
    np.save(folder / "labels.npy", splits.test_y[: sizes.eval])
    return "digits CNN (3 conv, 8x8 sklearn digits), top-1 on the test split"


def _prepare_lstm(folder: Path, sizes: Sizes) -> str:
    import torch

    from calibration.digits import load_digits_splits
    from models.lstm import HIDDEN, LAYERS, as_sequences, train_lstm
    from onnxq.export import export_torch

    splits = load_digits_splits()
    model = train_lstm(splits.train_x, splits.train_y)
    torch.save(model.state_dict(), folder / "torch_state.pt")
    calib, test = as_sequences(splits.calib_x), as_sequences(splits.test_x)
    export_torch(model, torch.from_numpy(calib[:1]), folder / "fp32.onnx")
    _save(folder, {"input": calib[: sizes.calib]}, {"input": test[: sizes.eval]})
    np.save(folder / "labels.npy", splits.test_y[: sizes.eval])
    return (
        f"LSTM({LAYERS} layers, hidden {HIDDEN}) over digit rows (8 steps x 8), "
        "top-1 on the test split"
    )


def _prepare_resnet(folder: Path, sizes: Sizes) -> str:
    import torch

    from calibration.images import eval_inputs, resnet_inputs
    from models.resnet import resnet18_factory
    from onnxq.export import export_torch

    model, example = resnet18_factory()
    torch.save(model.state_dict(), folder / "torch_state.pt")
    export_torch(model, example, folder / "fp32.onnx")
    _save(folder, {"input": resnet_inputs(sizes.calib)}, {"input": eval_inputs(sizes.eval)})
    return (
        "ResNet-18 (random init, BatchNorm warmed up on photo crops; no labels), "
        "SQNR and top-1 agreement vs fp32 on evaluation photo crops"
    )


def _prepare_minilm(folder: Path, sizes: Sizes) -> str:
    from calibration.text import calibration_sentences, encode, evaluation_sentences
    from models.minilm import DEFAULT_SEQ_LEN, export_minilm, load_tokenizer

    export_minilm(folder / "fp32.onnx", exporter="torchscript", seq_len=DEFAULT_SEQ_LEN)
    tokenizer = load_tokenizer()
    calib = encode(calibration_sentences(sizes.calib), tokenizer, DEFAULT_SEQ_LEN)
    evaluation = encode(evaluation_sentences(sizes.eval), tokenizer, DEFAULT_SEQ_LEN)
    _save(folder, calib, evaluation)
    return (
        "all-MiniLM-L6-v2 (pretrained, mean-pooled embeddings, torchscript export), cosine vs "
        f"fp32 on held-out stdlib-docstring sentences, batch 1, seq {DEFAULT_SEQ_LEN}"
    )
