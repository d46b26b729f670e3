"""tools/benchmark_formats.py end to end on a tiny model and 8 validation images: every row from
one run, both files written, the formats that compute the same thing give the same detections."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, tiny_overrides
from test_export import tiny_model

pytest.importorskip("onnx", reason="the ONNX rows need onnx: pip install -e .[export]")
pytest.importorskip("onnxruntime", reason="the ONNX rows need onnxruntime: pip install -e .[export]")


def test_tool_writes_one_table_of_every_format(shapes_dir, tmp_path, tiny_config):
    weights = tmp_path / "weights.pth"
    torch.save(tiny_model(tiny_config).state_dict(), weights)
    out = tmp_path / "bench"
    # compile is left out: minutes of compilation on 2 cores (tests/test_compiling.py covers it)
    formats = ["eager", "torchscript", "onnx", "onnx-int8"]
    overrides = tiny_overrides(shapes_dir, tmp_path / "run") + ["model.postprocess.score_thresh=0.02",
                                                               "eval.batch_size=4"]
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "benchmark_formats.py"),
                             "--config", str(REPO_ROOT / "configs" / "shapes_R18.yaml"), "--weights",
                             str(weights), "--out", str(out), "--formats", *formats, "--latency-images", "3",
                             "--rounds", "1", "--calibration-images", "8", *overrides],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    document = json.loads((out / "formats.json").read_text())
    rows = {row["format"]: row for row in document["rows"]}
    assert list(rows) == formats
    assert document["val_images"] == 8 and document["eval_batch_size"] == 4 and document["failures"] == []
    assert document["machine"]["cpu"] and document["machine"]["threads"] >= 1 and document["date"]
    for row in rows.values():
        assert 0 <= row["mAP"] <= 100 and row["images_per_s"] > 0 and 0 < row["ms_per_image_b1"] < 1e5
        assert row["size_mb"] > 0 and (out / "files").is_dir()
    assert rows["eager"]["detections"] > 0
    # TorchScript is eager's arithmetic: bit for bit; ONNX float32 within the tool's bound
    assert rows["torchscript"]["unmatched_vs_eager"] == 0 and rows["torchscript"]["mAP"] == rows["eager"]["mAP"]
    assert rows["onnx"]["unmatched_vs_eager"] <= 0.001 * rows["eager"]["detections"]
    assert rows["onnx-int8"]["size_mb"] < 0.5 * rows["onnx"]["size_mb"]  # int8 weights
    table = (out / "formats.md").read_text()
    assert document["date"] in table and document["machine"]["cpu"] in table
    assert all(f"| {name} |" in table for name in formats)
