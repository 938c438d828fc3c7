"""Peak host memory of an ONNX Runtime session, measured in a fresh process.

Linux: the baseline is ``VmRSS``; the high-water mark is reset to it (``5`` written to
``/proc/self/clear_refs``) and read back as ``VmHWM`` afterwards. ``ru_maxrss`` is not used
there: a child inherits its parent's high-water mark across fork + exec. Elsewhere:
``ru_maxrss`` (bytes on macOS, KiB on other Unixes) before and after.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxq.errors import first_line
from onnxq.runtime import Provider, make_session

Feed = dict[str, np.ndarray]


def status_bytes(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; ``None``
    where there is no ``/proc``."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak() -> bool:
    """Reset the ``VmHWM`` high-water mark to the current resident set (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def maxrss_bytes() -> int | None:
    """``ru_maxrss`` in bytes; ``None`` without the ``resource`` module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def session_peak_memory(
    paths: Sequence[os.PathLike[str] | str],
    names: Sequence[str],
    feeds: Sequence[Feed],
    provider: Provider,
    threads: int | None,
    notes: list[str],
) -> list[int | None]:
    """Peak RSS growth of creating a session for each model and running every feed twice, each
    model in a fresh subprocess; ``None`` (with a note) where it could not be measured."""
    if maxrss_bytes() is None:
        notes.append("peak memory not measured: no resource module on this platform")
        return [None] * len(paths)
    peaks: list[int | None] = []
    with tempfile.TemporaryDirectory(prefix="onnxq-mem-") as tmp:
        feed_paths = []
        for i, feed in enumerate(feeds):
            feed_paths.append(Path(tmp) / f"feed{i}.npz")
            np.savez(feed_paths[-1], **feed)
        root = Path(__file__).resolve().parents[1]
        path_var = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_var)}
        code = "import sys; from onnxq.memory import probe; probe(sys.argv[1:])"
        for path, name in zip(paths, names, strict=True):
            args = [str(path), provider.value, str(threads or 0), *map(str, feed_paths)]
            peak, why = None, ""
            try:
                done = subprocess.run(
                    [sys.executable, "-c", code, *args],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    env=env,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                why = first_line(exc)
            else:
                lines = done.stdout.strip().splitlines()
                try:
                    report = json.loads(lines[-1])
                    peak = max(0, int(report["peak"]) - int(report["baseline"]))
                except (ValueError, IndexError, KeyError, TypeError):
                    errors = done.stderr.strip().splitlines()
                    why = errors[-1] if errors else f"exit code {done.returncode}"
            if peak is None:
                notes.append(f"peak memory of {name} not measured: {why}")
            peaks.append(peak)
    return peaks


def probe(argv: Sequence[str]) -> None:
    """Subprocess body (``MODEL PROVIDER THREADS FEED.npz...``): baseline, session and runs,
    then ``{"baseline": bytes, "peak": bytes}`` on stdout."""
    model, provider, threads, *feed_paths = argv
    feeds = []
    for path in feed_paths:
        with np.load(path, allow_pickle=False) as data:
            feeds.append({k: data[k] for k in data.files})
    gc.collect()
    linux = status_bytes("VmRSS") is not None
    if linux:
        baseline = status_bytes("VmRSS")
        reset_peak()  # if refused, VmHWM also covers the imports (an over-estimate)
    else:
        baseline = maxrss_bytes()
    session = make_session(model, provider, intra_op_threads=int(threads) or None)
    for feed in feeds:
        session.run(None, feed)
        session.run(None, feed)
    peak = status_bytes("VmHWM") if linux else maxrss_bytes()
    sys.stdout.write(json.dumps({"baseline": baseline, "peak": peak}) + "\n")
