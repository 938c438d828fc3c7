"""Smoke test of the benchmark harness: the digits model, ``--quick`` (about 15 s)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from benchmarks.run import main, parse_args
from benchmarks.variants import VARIANTS


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--models", "digits", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_json_has_every_row(results):
    _, data = results
    assert data["run"]["quick"] is True and data["run"]["models"] == ["digits"]
    assert data["environment"]["onnxruntime"] and "vnni" in data["environment"]["cpu_features"]
    (model,) = data["models"]
    rows = {row["slug"]: row for row in model["rows"]}
    assert list(rows) == ["fp32", *(v.slug for v in VARIANTS)]
    for slug, row in rows.items():
        assert row["status"] == "ok", (slug, row["reason"])
        assert row["p50_ms"] > 0 and row["size_bytes"] > 0 and row["x_fp32"] > 0
        assert 0.8 <= row["metrics"]["top1"] <= 1.0
        assert row["metrics"]["agreement"] >= 0.8
        assert row["x_ort_best"] is not None
        if slug not in ("fp32", "torch-fp32"):
            assert row["quantize_s"] > 0 and row["peak_mb"] > 0
            if not slug.startswith("onnxq-dynamic"):  # dynamic mode keeps a CNN's Convs float
                assert row["size_x_fp32"] < 0.6  # int8 weights
    assert rows["fp32"]["x_fp32"] == 1.0 and rows["ort-static-best"]["x_ort_best"] == 1.0


def test_markdown_table_is_written(results):
    out, _ = results
    text = (out / "results.md").read_text()
    assert "## digits" in text and "| variant | top-1 | agree | p50 ms |" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 1 + len(VARIANTS)  # header + fp32 + one per variant
    for variant in VARIANTS:
        assert any(line.startswith(f"| {variant.label} |") for line in table)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--models", "alexnet"])
    with pytest.raises(SystemExit):
        parse_args(["--variants", "ort-static-defaults,nope"])
    args = parse_args(["--models", "lstm,digits", "--quick"])
    assert args.models == ["lstm", "digits"] and args.quick
