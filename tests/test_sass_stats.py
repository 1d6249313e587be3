"""scripts/sass_stats.py: loop finding and counts on a hand-written listing, then on our real
prefill kernel (built for sm_90a on the CPU; needs the CUDA toolkit and a cuobjdump)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_stats", REPO / "scripts" / "sass_stats.py")
sass_stats = sys.modules["sass_stats"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(sass_stats)

LISTING = """
        code for sm_90a
                Function : kernel_a
        /*0000*/                   MOV R1, c[0x0][0x28] ;                          /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0030*/               @P0 HMMA.16816.F32.BF16 R8, R12, R18, R8 ;
        /*0040*/                   STL [R1], R8 ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;                             /* target 0x0020 */
        /*0060*/                   BRA 0x20 ;
        /*0070*/                   STG.E desc[UR4][R6.64], R8 ;
        /*0080*/                   EXIT ;
                Function : kernel_b
        /*0000*/                   FADD R0, R1, R2 ;
        /*0010*/                   EXIT ;
"""


def test_opcode_drops_predicates_and_modifiers():
    assert sass_stats.opcode("@!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4") == "HMMA"
    assert sass_stats.opcode("@UPT LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]") == "LDGSTS"
    assert sass_stats.opcode("EXIT") == "EXIT"


def test_loops_are_backward_branches_with_their_bodies():
    functions = sass_stats.parse(LISTING)
    assert list(functions) == ["kernel_a", "kernel_b"]
    assert len(functions["kernel_a"]) == 9 and len(functions["kernel_b"]) == 2
    (loop,) = sass_stats.loops(functions["kernel_a"])  # `BRA 0x20` at 0x60; the forward branch is none
    assert (loop.start, loop.end, loop.size, loop.mmas) == (0x20, 0x60, 5, 2)
    assert loop.opcodes["STL"] == 1 and loop.opcodes["STG"] == 0
    text = sass_stats.report("kernel_a", functions["kernel_a"])
    assert "5 instructions, 2 HMMA (2.50 per HMMA), spills LDL 0 / STL 1" in text
    assert "global stores STG 1" in text
    assert "no loop with MMAs" in sass_stats.report("kernel_b", functions["kernel_b"])


def test_our_prefill_loop_holds_whole_tiles_of_mmas(cuda_home, kernel_cache, monkeypatch):
    """Per warp, one K/V tile of kN keys costs 32 rows x kN keys x 128 dims of QK and as much of
    PV: kN / 32 * 128 HMMA (m16n8k16), plus kN / 8 for the row sums of P on 64-key tiles (one MMA per
    16 keys and 16 rows, traits.cuh's kMmaRowSum). The hottest loop must hold whole tiles of them."""
    try:
        sass_stats.cuobjdump()
    except SystemExit:
        pytest.skip("no cuobjdump (neither in CUDA_HOME nor beside triton)")
    from engine_backend import prefill
    from engine_backend.kernels import jit, specs
    from engine_backend.variants import DEFAULT

    monkeypatch.setenv(jit.CACHE_ENV, str(kernel_cache))
    for tile in prefill.tile_shapes(128):
        lib = jit.build(specs.prefill_spec(torch.bfloat16, 128, DEFAULT, tile), "90a")
        (kernel,) = [ins for n, ins in sass_stats.parse(sass_stats.sass_of(str(lib))).items() if "attention_kernel" in n]
        hot = sass_stats.loops(kernel)[0]
        per_tile = tile.kv_tile // 32 * 128 + (tile.kv_tile // 8 if tile.kv_tile >= 64 else 0)
        assert hot.mmas >= per_tile and hot.mmas % per_tile == 0, (tile, hot.mmas)


def test_wgmma_prefill_loop_issues_whole_tiles_of_warpgroup_mmas(cuda_home, kernel_cache, monkeypatch):
    """The Hopper mainloop: per K/V tile and 64-row block (two on 64-key tiles), D / 16 warpgroup MMAs for S
    and kN / 16 for P V (HGMMA), no spills in the loop that holds them."""
    try:
        sass_stats.cuobjdump()
    except SystemExit:
        pytest.skip("no cuobjdump (neither in CUDA_HOME nor beside triton)")
    from engine_backend import prefill
    from engine_backend.kernels import jit, specs
    from engine_backend.variants import DEFAULT

    monkeypatch.setenv(jit.CACHE_ENV, str(kernel_cache))
    for tile in (prefill.TileShape(4, 64, "wgmma"), prefill.TileShape(8, 128, "wgmma")):
        lib = jit.build(specs.prefill_spec(torch.bfloat16, 128, DEFAULT, tile), "90a")
        (kernel,) = [ins for n, ins in sass_stats.parse(sass_stats.sass_of(str(lib))).items() if "attention_kernel" in n]
        loops = [loop for loop in sass_stats.loops(kernel) if loop.opcodes["HGMMA"]]
        blocks = 2 if tile.kv_tile == 64 else 1
        per_tile = blocks * (128 // 16 + tile.kv_tile // 16)
        assert loops and all(loop.opcodes["HGMMA"] % per_tile == 0 for loop in loops), (tile, loops)
        assert not any(loop.opcodes["LDL"] or loop.opcodes["STL"] for loop in loops), tile
        assert not any(loop.mmas > tile.kv_tile // 8 * 2 for loop in loops), tile  # only the row-sum HMMAs
