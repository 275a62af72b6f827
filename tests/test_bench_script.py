"""Smoke test of scripts/bench.py: it runs at tiny shapes and writes the JSON it promises."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
ROWS = ("torch_float", "torch_quantized", "flax_mhdpa", "ours_float", "int8_accurate",
        "int8_accurate_int8attn", "int8_torch", "int8_dynamic", "int8_dynamic_int8attn")
ROW_KEYS = {"label", "latency_ms", "min_ms", "sqnr_db", "sqnr_reference", "variable_bytes",
            "over_torch_quantized", "over_our_float", "bytes_over_float"}


def test_quick_run_writes_every_row_and_goal(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--shapes", "32,4,8,2", "--json", str(out)],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ours int8 dynamic" in proc.stdout and " met" in proc.stdout, proc.stdout[-3000:]
  result = json.loads(out.read_text())
  for key in ("repeats", "torch_threads", "xla_flags", "loadavg_start", "loadavg_end",
              "idle_waited_s", "calibration", "torch_quantized_includes_input_quantization",
              "shapes", "raw_matmul"):
    assert key in result, key
  (shape,) = result["shapes"]
  assert shape["shape"] == {"E": 32, "H": 4, "L": 8, "N": 2}
  assert "foreign_load_cores" in shape and "blocks_redone" in shape
  assert set(shape["rows"]) == set(ROWS)
  for name, row in shape["rows"].items():
    assert ROW_KEYS <= set(row), (name, ROW_KEYS - set(row))
    assert row["latency_ms"] > 0, name
  rows = shape["rows"]
  # Same weights and input: torch float and Flax agree with our float; every int8
  # module is a usable approximation.
  # ("inf" when bitwise equal: JSON has no infinity)
  assert float(rows["torch_float"]["sqnr_db"]) > 80 and float(rows["flax_mhdpa"]["sqnr_db"]) > 80
  for name in ROWS[4:]:
    assert float(rows[name]["sqnr_db"]) > 20, (name, rows[name]["sqnr_db"])
    assert rows[name]["variable_bytes"] < rows["ours_float"]["variable_bytes"], name
  assert shape["best_int8"] in ROWS[4:]
  assert len(shape["goals"]) == 5
  assert all({"goal", "value", "op", "limit", "met"} <= set(g) for g in shape["goals"])
  assert len(result["raw_matmul"]) == 1
