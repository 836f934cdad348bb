"""The SASS loop parser of experiments/gpu_checks/sass_report.py on a hand-written listing (the
script itself needs a Triton install, which the test environment does not have)."""

from __future__ import annotations

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "gpu_checks" / "sass_report.py"


def _load():
  spec = importlib.util.spec_from_file_location("sass_report", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/                   FFMA R6, R2.reuse, R4, R5 ;
        /*0030*/                   FMUL R7, R6, R6 ;
        /*0040*/               @P0 LDG.E.U16 R8, desc[UR4][R10.64] ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   STG.E desc[UR4][R12.64], R7 ;
        /*0080*/                   EXIT ;
"""


def test_loop_mix_counts_the_instructions_of_the_largest_loop():
  report = _load().loop_mix(LISTING)
  # The loop runs from 0x10 back-branch at 0x60: 6 instructions, 3 of them FP32 arithmetic.
  assert report.startswith("loop: 6 instructions, 50% FP32 arithmetic")
  assert "FFMA:2" in report and "FMUL:1" in report and "LDG:1" in report and "BAR:1" in report
  assert "MOV" not in report and "STG" not in report


def test_loop_mix_without_a_loop_counts_the_whole_kernel():
  listing = LISTING.replace("@P1 BRA 0x10", "@P1 BRA 0x80")
  report = _load().loop_mix(listing)
  assert report.startswith("kernel (no loop): 9 instructions, 33% FP32 arithmetic")


READS_LISTING = """
        /*0000*/                   FFMA R2, R4.reuse, R6, R8 ;
        /*0010*/                   FFMA R3, R4, R7, R9 ;
        /*0020*/                   FADD R5, R3, -R9 ;
        /*0030*/                   LDG.E R10, desc[UR4][R12.64] ;
        /*0040*/                   FMUL R11, R10, 0.5 ;
        /*0050*/               @P0 BRA 0x0 ;
        /*0060*/                   EXIT ;
"""


def test_operand_reads_counts_file_reads_reuse_hits_and_one_bank_triples():
  report = _load().operand_reads(READS_LISTING)
  # 0x00: R4, R6, R8 from the file, all even (one bank); 0x10: R4 from the reuse cache (same slot,
  # .reuse just before), R7 and R9 from the file; 0x20: R3, R9; 0x40: R10. 8 reads over 4 FP32
  # instructions, 1 reuse hit, 1 instruction with three reads in one bank.
  assert report == ("operand reads: 2.00 registers per FP32 instruction from the file, 0.25 from the "
                    "reuse cache; 25% with three reads in one bank")


def test_operand_reads_needs_the_same_slot_for_a_reuse_hit():
  listing = READS_LISTING.replace("FFMA R3, R4, R7, R9", "FFMA R3, R7, R4, R9")
  report = _load().operand_reads(listing)
  assert report.startswith("operand reads: 2.25 registers per FP32 instruction from the file, 0.00 from")
