"""e2e/sglang_one_batch.py: its table, its failure path, and (SGLang env) that the runner it starts accepts our
backend name, which SGLang's own `python -m sglang.benchmark.one_batch` rejects."""

from __future__ import annotations

import subprocess
import sys

import pytest

from e2e import sglang_one_batch


def _row(batch, length, seconds):
    return {"batch_size": batch, "input_len": length, "median_decode_latency": seconds}


def test_table_gives_each_backend_over_the_first_and_marks_missing_cells():
    text = sglang_one_batch.table({
        "engine_backend": [_row(32, 512, 0.0050), _row(1, 512, 0.0040)],
        "triton": [_row(32, 512, 0.0055)],
    })
    lines = text.splitlines()
    assert lines[0] == "| batch | input len | engine_backend ms | triton ms | triton / engine_backend |"
    assert lines[2] == "| 1 | 512 | 4.000 | - | - |"  # sorted by batch; triton has no such row
    assert lines[3] == "| 32 | 512 | 5.000 | 5.500 | 1.100 |"


def test_a_backend_that_fails_is_reported_with_its_log_and_fails_the_run(tmp_path, monkeypatch, capsys):
    # Without SGLang the runner cannot import it; with SGLang the unknown flag stops its parser: both exit non-zero.
    monkeypatch.setattr(sys, "argv", ["x", "--backends", "triton", "--out", str(tmp_path), "--", "--no-such-flag"])
    assert sglang_one_batch.main() == 1
    assert "triton: one_batch exited" in capsys.readouterr().err
    assert (tmp_path / "triton.log").read_text()
    assert not (tmp_path / "one_batch.md").exists()


@pytest.mark.sglang
def test_the_runner_accepts_our_backend_name():
    ran = subprocess.run([sys.executable, "-c", sglang_one_batch.RUNNER, "--help"], capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    choices = ran.stdout[ran.stdout.index("--attention-backend"):]
    assert "engine_backend" in choices.split("--", 2)[1]
