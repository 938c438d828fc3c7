"""English sentences that ship offline: the docstrings of Python standard-library modules.

``MODULES`` is a fixed list of standard-library modules. The docstrings (``inspect.getdoc``) of
each module and of the classes, functions and methods it defines are split into paragraphs
(code and doctest paragraphs dropped) and then into sentences. A sentence is kept when it is
6 to 40 words of plain prose: ASCII letters, spaces and ordinary punctuation only, starting with
a capital letter and ending with a full stop. Sentences are deduplicated.

Splits are disjoint by construction: a sentence's SHA-256 decides its split once and for all
(``EVAL_SHARE`` of the hash space is evaluation, the rest calibration), and each split is ordered
by that hash, a fixed shuffle that mixes topics. The same Python version gives the same lists.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import numpy as np

MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmath",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "enum",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "math",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unittest", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.etree.ElementTree",
    "zipfile",
)  # fmt: skip
MIN_WORDS = 6
MAX_WORDS = 40
EVAL_SHARE = 0.4
DEFAULT_SEQ_LEN = 64

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'\"()\-]*[a-z)]\.$")
_CODE_HINTS = (">>>", "::", "...", "e.g", "i.e", " etc", "``")


@cache
def all_sentences() -> tuple[str, ...]:
    """Every kept sentence, deduplicated, in hash order (see the module docstring)."""
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # e.g. typing.io's docstring
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # an optional stdlib module missing from this build
                continue
            for doc in _docstrings(module):
                found.update(_sentences(doc))
    return tuple(sorted(found, key=_digest))


def calibration_sentences(n: int) -> list[str]:
    """The first ``n`` calibration sentences (never evaluation ones)."""
    return _take(_split(False), n, "calibration")


def evaluation_sentences(n: int) -> list[str]:
    """The first ``n`` evaluation sentences (never calibration ones)."""
    return _take(_split(True), n, "evaluation")


def encode(
    sentences: Sequence[str], tokenizer: Any, seq_len: int = DEFAULT_SEQ_LEN
) -> dict[str, np.ndarray]:
    """Tokenize, pad or truncate to ``seq_len``: ``input_ids``/``attention_mask`` int64."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not sentences:
        raise ValueError("no sentences to encode")
    batch = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="np",
    )
    return {
        "input_ids": np.ascontiguousarray(batch["input_ids"], dtype=np.int64),
        "attention_mask": np.ascontiguousarray(batch["attention_mask"], dtype=np.int64),
    }


def uneven_batches(
    sentences: Sequence[str],
    tokenizer: Any,
    *,
    batch_sizes: Sequence[int] = (1, 5, 3, 8),
    seq_lens: Sequence[int] = (16, 64, 40, 24),
) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts over ``sentences`` whose batch size and padded length both vary.

    Batch ``i`` takes the next ``batch_sizes[i % len]`` sentences (fewer at the end) padded to
    ``seq_lens[i % len]`` tokens: variable shapes, for calibration on dynamic axes.
    """
    if not batch_sizes or not seq_lens or min(batch_sizes) < 1:
        raise ValueError("batch_sizes and seq_lens must be non-empty, batch sizes >= 1")
    start = index = 0
    while start < len(sentences):
        size = batch_sizes[index % len(batch_sizes)]
        yield encode(sentences[start : start + size], tokenizer, seq_lens[index % len(seq_lens)])
        start += size
        index += 1


def _docstrings(module: Any) -> Iterator[str]:
    """The module's docstring, then those of its own classes, functions and methods."""
    yield inspect.getdoc(module) or ""
    for _, member in sorted(vars(module).items()):
        if not (inspect.isclass(member) or inspect.isfunction(member)):
            continue
        if getattr(member, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(member) or ""
        if inspect.isclass(member):
            for _, method in sorted(vars(member).items()):
                if inspect.isfunction(method):
                    yield inspect.getdoc(method) or ""


def _sentences(doc: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>")) for line in lines):
            continue  # code, doctests and indented lists
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            sentence = sentence.strip()
            words = len(sentence.split())
            if not MIN_WORDS <= words <= MAX_WORDS or not _PROSE.match(sentence):
                continue
            if any(hint in sentence for hint in _CODE_HINTS):
                continue
            yield sentence


def _digest(sentence: str) -> str:
    return hashlib.sha256(sentence.encode("utf-8")).hexdigest()


def _is_eval(sentence: str) -> bool:
    return int(_digest(sentence)[:8], 16) < EVAL_SHARE * 16**8


@cache
def _split(evaluation: bool) -> tuple[str, ...]:
    return tuple(s for s in all_sentences() if _is_eval(s) == evaluation)


def _take(pool: tuple[str, ...], n: int, what: str) -> list[str]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > len(pool):
        raise ValueError(f"only {len(pool)} {what} sentences, asked for {n}")
    return list(pool[:n])
