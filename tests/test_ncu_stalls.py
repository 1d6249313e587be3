"""scripts/ncu_stalls.py on a hand-written Nsight Compute source-page CSV (no GPU, no ncu)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ncu_stalls", REPO / "scripts" / "ncu_stalls.py")
ncu_stalls = sys.modules["ncu_stalls"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ncu_stalls)

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
          "stall_wait", "stall_long_sb (Not Issued)"]
ROWS = [  # prologue, a loop of two MMAs (0x20-0x40), a short loop without MMAs, epilogue
    ["0x10", "LDG.E R2, desc[UR4][R4.64]", "5", "100", "5", "0", "4"],
    ["0x20", "HMMA.16816.F32.BF16 R8, R12, R16, R8", "7", "400", "0", "7", "0"],
    ["0x30", "HMMA.16816.F32.BF16 R8, R12, R18, R8", "3", "400", "0", "3", "0"],
    ["0x40", "@P0 BRA 0x20", "1", "400", "0", "1", "0"],
    ["0x50", "IADD3 R1, R1, 1, RZ", "2", "1,000", "0", "2", "0"],
    ["0x60", "@P1 BRA 0x50", "0", "1,000", "0", "0", "0"],
    ["0x70", "STG.E desc[UR4][R6.64], R8", "4", "100", "4", "0", "0"],
]


def write_csv(path: Path) -> Path:
    lines = ['"Kernel Name","k",'] + [",".join(f'"{x}"' for x in row) for row in [HEADER] + ROWS]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_main_loop_is_the_backward_branch_with_most_mmas(tmp_path):
    _, rows = ncu_stalls.load(str(write_csv(tmp_path / "k.csv")))
    assert ncu_stalls.main_loop(rows) == (1, 3)


def test_report_splits_samples_around_the_loop(tmp_path):
    lines = ncu_stalls.report(str(write_csv(tmp_path / "k.csv")), top=2).splitlines()
    assert lines[0].endswith("22 samples, 0.00 M instructions executed")
    region = {line.strip().split("  ")[0]: line for line in lines if "samples (" in line}
    assert "5 samples" in region["before loop"] and "long_sb 5" in region["before loop"]
    assert "11 samples" in region["loop"] and "wait 11" in region["loop"]
    assert "6 samples" in region["after loop"]  # the short loop without MMAs counts as epilogue
    assert not any("Not Issued" in line for line in lines)  # not a reason of its own
    # the two hottest instructions (7 and 5 samples), in address order
    assert lines[-2].split()[:2] == ["#0", "5"] and lines[-1].split()[:2] == ["#1", "7"]
