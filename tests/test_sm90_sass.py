"""scripts/sm90_sass.py: the static sm_90 SASS profile (compile-time estimates).

Checks: the parser and classifier on a hand-written SASS listing; the
whole counter on a tiny Triton kernel compiled for sm_90 whose main loop is
known (one 128-bit load and a fixed number of FFMAs per trip); the script's
CI subsets (one GEMV case; one training-shape case, whose strategy must be
the dispatcher's), whose reports must carry the keys the benchmarks read. Compiles run in a subprocess with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sm90_sass.py"
sys.path.insert(0, str(ROOT))
from scripts import sm90_sass as ss  # noqa: E402

LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_0:
	//## File "k.py", line 7
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/              @!PT LDS RZ, [RZ] ;
        /*0040*/                   FFMA R8, R4, R8, R4 ;
        /*0050*/                   FFMA R9, R5, R9, R5 ;
        /*0060*/                   LDS.U8 R10, [R11] ;
        /*0070*/                   SHFL.IDX PT, R12, R13, R14, 0x1f ;
        /*0080*/                   LDSM.16.M88.4 R16, [R15] ;
        /*0090*/                   STS.U16 [R15], R12 ;
        /*00a0*/                   F2FP.BF16.F32.PACK_AB R20, R9, R8 ;
        /*00b0*/                   ISETP.GE.AND P0, PT, R0, UR5, PT ;
        /*00c0*/              @!P0 BRA `(.L_x_0) ;
        /*00d0*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;
        /*00e0*/                   EXIT ;
"""


def test_parser_finds_the_loop_and_counts_each_class():
    instrs, labels = ss.parse_sass(LISTING)
    assert len(instrs) == 15 and labels == {".L_x_0": 0x20}
    body = ss.main_loop(instrs, labels)
    assert [i.opcode for i in (body[0], body[-1])] == ["LDG.E.128", "BRA"]
    c = ss.count(body)
    assert c["instructions"] == 11
    assert c["classes"] == {"LDG": 1, "nop": 1, "fp32": 2, "LDS": 1, "SHFL": 1, "LDSM": 1,
                            "STS": 1, "convert": 1, "other": 2}
    assert c["widths"] == {"LDG.128": 1, "LDS.8": 1, "STS.16": 1}
    # LSU: LDG, LDS, SHFL, LDSM, STS (the predicated-off LDS never issues to it).
    assert c["lsu"] == 5
    # Shared bytes per warp: LDS.U8 32, LDSM x4 512, STS.U16 64; one wavefront
    # at least per instruction: 1 + 4 + 1.
    assert c["smem_bytes"] == 32 + 512 + 64 and c["smem_wavefronts"] == 6


def test_bounds_follow_the_model():
    counts = {"instructions": 640, "lsu": 40, "smem_bytes": 0, "smem_wavefronts": 0}
    # 1 warp, 4096 weights per trip: 640 * 32 / 4096 = 5 thread-instructions per weight.
    b = ss.bounds(counts, 1, 4096, ss.floor_bytes_per_weight(64, True))
    assert b["thread_instr_per_weight"] == 5.0
    floor = ss.floor_bytes_per_weight(64, True) / ss.HBM_BYTES_PER_S
    assert b["issue_over_floor"] == pytest.approx(640 / 4096 / ss.ISSUE_PER_S / floor, abs=1e-3)
    assert b["bound_over_floor"] == max(b["issue_over_floor"], b["lsu_over_floor"], b["smem_over_floor"])
    assert ss.floor_bytes_per_weight(64, False) == 0.5 + 4 / 64
    assert ss.grid_factor(132) == 1.0 and ss.grid_factor(133) == pytest.approx(264 / 133, abs=1e-3)


def _launch(**kw):
    base = dict(registers=64, shared=0, warps=4, programs=4 * ss.SMS, trips=10,
                loop_instructions=500, loop_lsu=50, loop_smem_wavefronts=0,
                loop_load_bytes=8192, pipeline_depth=1, floor_s=1e-5)
    return ss.Launch(**{**base, **kw})


def test_bound_model_counts_the_warps_each_scheduler_holds():
    # Issue 22's case: 256 one-warp programs, 2 warps per SM, so two of the four
    # schedulers idle: the per-scheduler bound is twice the all-scheduler one.
    m = ss.bound_model(_launch(warps=1, programs=256, registers=72, trips=32,
                               loop_instructions=1260, loop_load_bytes=4096, floor_s=8e-6))
    assert (m["programs_per_sm"], m["waves"], m["warps_per_sm"], m["warps_per_scheduler"]) == (2, 1, 2, 1)
    assert m["issue_per_scheduler_over_floor"] == pytest.approx(32 * 1260 / ss.CLOCK_HZ / 8e-6, abs=1e-3)
    assert m["issue_per_scheduler_over_floor"] == pytest.approx(2 * m["issue_over_floor"], abs=2e-3)
    names = ("issue", "issue_per_scheduler", "latency", "lsu", "smem", "l1")
    assert m["bound_over_floor"] == max(m[f"{k}_over_floor"] for k in names)
    assert m["bound_over_floor"] == m[f"{m['binding']}_over_floor"]
    # Four warps per scheduler: the two issue bounds agree.
    m = ss.bound_model(_launch(warps=4, programs=4 * ss.SMS))
    assert m["warps_per_scheduler"] == 4
    assert m["issue_per_scheduler_over_floor"] == pytest.approx(m["issue_over_floor"], abs=1e-3)


def test_bound_model_occupancy_and_waves():
    # Registers: 255 -> 256 per thread x 8 warps x 32 = 65536: one program per SM.
    assert ss.programs_per_sm(255, 8, 0) == 1
    assert ss.programs_per_sm(64, 4, 100 * 1024) == 2       # shared memory
    assert ss.programs_per_sm(32, 16, 0) == 4               # 64 warps per SM
    assert ss.programs_per_sm(16, 1, 0) == ss.MAX_PROGRAMS_PER_SM
    m = ss.bound_model(_launch(registers=255, warps=8, programs=3 * ss.SMS + 1))
    assert (m["programs_per_sm"], m["waves"]) == (1, 4)
    # A fourth wave for one program: every bound on the busiest SM grows by 4/3.
    even = ss.bound_model(_launch(registers=255, warps=8, programs=3 * ss.SMS))
    assert m["lsu_over_floor"] == pytest.approx(even["lsu_over_floor"] * 4 / 3, rel=1e-3)
    assert m["latency_over_floor"] == pytest.approx(even["latency_over_floor"] * 4 / 3, rel=1e-3)
    with pytest.raises(ValueError, match="no program fits"):
        ss.bound_model(_launch(shared=300 * 1024))
    with pytest.raises(ValueError, match="programs, trips and floor_s must be positive"):
        ss.bound_model(_launch(programs=0))


def test_bound_model_latency_is_littles_law():
    # Floor = the loads' bytes at HBM bandwidth; then latency over floor is the
    # bytes needed in flight per SM over the bytes actually in flight.
    programs, trips, load = 4 * ss.SMS, 16, 4096
    floor = programs * trips * load / ss.HBM_BYTES_PER_S
    for depth in (1, 2, 3):
        m = ss.bound_model(_launch(programs=programs, trips=trips, loop_load_bytes=load,
                                   pipeline_depth=depth, floor_s=floor), latency_s=700e-9)
        assert m["bytes_in_flight_per_sm"] == 4 * load * depth
        needed = ss.HBM_BYTES_PER_S * 700e-9 / ss.SMS
        assert m["latency_over_floor"] == pytest.approx(needed / (4 * load * depth), rel=1e-3)
    slow = ss.bound_model(_launch(floor_s=floor, programs=programs, trips=trips), latency_s=1400e-9)
    fast = ss.bound_model(_launch(floor_s=floor, programs=programs, trips=trips), latency_s=700e-9)
    assert slow["latency_over_floor"] == pytest.approx(2 * fast["latency_over_floor"], rel=1e-3)
    assert slow["latency_ns"] == 1400


def test_bound_model_l1_counts_lines_at_the_fitted_rate():
    # 2 warps x 100 lines per trip x 10 trips x 4 programs on the busiest SM.
    m = ss.bound_model(_launch(warps=2, programs=4 * ss.SMS, loop_l1_lines=100.0, floor_s=1e-6))
    t = 4 * 2 * 10 * 100 * ss.L1_CLOCKS_PER_LINE / ss.CLOCK_HZ
    assert m["l1_over_floor"] == pytest.approx(t / 1e-6, abs=1e-3)
    assert m["binding"] == "l1" and m["estimate_us"] == pytest.approx(t * 1e6, abs=0.01)
    # No lines: never binding; the estimate is at least the floor.
    m = ss.bound_model(_launch(loop_l1_lines=0.0, floor_s=1.0))
    assert m["l1_over_floor"] == 0 and m["estimate_us"] == pytest.approx(1e6)


def test_access_descriptions_count_lines_per_warp_load():
    # A row per lane, 16 bytes of each: 32 rows (4 KB apart) are 32 lines; the
    # scales one row per lane (128 B apart at K = 8192: 32 lines), their nested
    # absmax2 16 floats (1 line), the code2 gather of 32 codes; x one line.
    acc = ss.access_lines("_nf4_gemv_fma_kernel", "row_per_lane", {"BLOCK_N": 64, "BLOCK_K": 64},
                          1, 8192, 64, True, 2, 1)
    got = {a.operand: (a.instructions, a.lines) for a in acc}
    assert got == {"words": (4, 32), "absmax": (2, 32), "absmax2": (2, 1),
                   "code2": (2, ss.code2_lines(32)), "x": (2, 1)}
    assert ss.code2_lines(1) == 0.6 and 5.7 < ss.code2_lines(32) < 6 and ss.code2_lines(16) < 5
    # The "lines" layout: 8 lanes per row, 4 rows x 128 B per load (4 lines);
    # the scales 4 rows x 4 blocks (4 lines); x 512 B (4 lines) per load,
    # each lane's pieces on Triton 3.6 (4 loads), the trip's columns once on
    # 3.9 (1 load of bf16, 2 of fp32).
    acc = ss.access_lines("_nf4_gemv_fma_kernel", "lines", {"BLOCK_N": 16, "BLOCK_K": 256},
                          1, 8192, 64, True, 2, 1, "3.6.0")
    got = {a.operand: (a.instructions, a.lines) for a in acc}
    assert got == {"words": (4, 4), "absmax": (4, 4), "absmax2": (4, 1),
                   "code2": (4, ss.code2_lines(16)), "x": (4, 4)}
    for elem, loads in ((2, 1), (4, 2)):
        acc39 = ss.access_lines("_nf4_gemv_fma_kernel", "lines", {"BLOCK_N": 16, "BLOCK_K": 256},
                                1, 8192, 64, True, elem, 1, "3.9.0")
        assert {a.operand: (a.instructions, a.lines) for a in acc39}["x"] == (loads, 4)
    # The "fragment" layout (tensor-core GEMV, 128x256 w8): a lane's 16-byte
    # runs of 2 rows x 2 runs (4 loads of 8 rows, 8 lines); the scales of 8
    # rows x the quad's 4 blocks per load, one per lane and row at blocksize
    # 64 and one per run at 32; x [16, 256] bf16 over 8 warps: 2 loads of a
    # 512-byte row (4 lines) each, a quarter of them for M = 4.
    acc = ss.access_lines("_nf4_gemv_dot_kernel", "fragment", {"BLOCK_N": 128, "BLOCK_K": 256},
                          8, 8192, 64, True, 2, 16)
    got = {a.operand: (a.instructions, a.lines) for a in acc}
    assert got == {"words": (4, 8), "absmax": (2, 8), "absmax2": (2, 1),
                   "code2": (2, ss.code2_lines(32)), "x": (2, 4)}
    acc = ss.access_lines("_nf4_gemv_dot_kernel", "fragment", {"BLOCK_N": 128, "BLOCK_K": 256},
                          8, 8192, 32, False, 2, 4)
    got = {a.operand: (a.instructions, a.lines) for a in acc}
    assert got == {"words": (4, 8), "absmax": (4, 8), "x": (2, 1)}
    # K = 4096: two rows' scales share a line.
    acc = ss.access_lines("_nf4_gemv_fma_kernel", "row_per_lane", {"BLOCK_N": 64, "BLOCK_K": 64},
                          1, 4096, 64, True, 2, 1)
    assert {a.operand: a.lines for a in acc}["absmax"] == 16
    assert ss._span_lines(4, 128, 4096) == 4 and ss._span_lines(32, 16, 16) == 4  # 512 B coalesced
    assert ss.access_lines("_nf4_dequantize_kernel", "row_per_lane", {}, 4, 64, 64, True, 2, 1) is None
    loop = {"global_loads": 12, "coalesced_lines": 12, "smem_wavefronts": 34}
    l1 = ss.l1_lines_per_trip(loop, acc)
    assert l1["l1_access_check"] == "ok" and l1["l1_lines"] == l1["l1_global_lines"] + 34
    assert "the loop has 11" in ss.l1_lines_per_trip(dict(loop, global_loads=11), acc)["l1_access_check"]
    assert ss.l1_lines_per_trip(loop, None)["l1_lines"] == 12 + 34
    # The dequantize kernel ("rows"), 256 rows of 64 per program, 4 warps: a
    # warp's 2 KB of packed bytes (4 loads of 4 lines), its 4096 code gathers
    # over 32 lanes (1 line each), 2 loads per scale kind and the offset, and
    # its 8 KB of bf16 out (16 stores of 4 lines), checked against the STGs.
    acc = ss.access_lines("_nf4_dequantize_kernel", "rows", {"ROWS": 256}, 4, 64, 64, True, 2, 0)
    got = {a.operand: (a.instructions, a.lines, a.store) for a in acc}
    assert got == {"words": (4, 4, False), "code": (128, 1, False), "absmax": (2, 1, False),
                   "absmax2": (2, 1, False), "code2": (2, ss.code2_lines(32), False),
                   "offset": (1, 1, False), "out": (16, 4, True)}
    deq = {"global_loads": 139, "global_stores": 16, "coalesced_lines": 0, "smem_wavefronts": 0}
    assert ss.l1_lines_per_trip(deq, acc)["l1_access_check"] == "ok"
    lines = 16 + 128 + 2 + 2 + 1 + 64 + 2 * ss.code2_lines(32)
    assert ss.l1_lines_per_trip(deq, acc)["l1_global_lines"] == pytest.approx(lines, abs=1e-3)
    assert "and 15" in ss.l1_lines_per_trip(dict(deq, global_stores=15), acc)["l1_access_check"]


def test_pipeline_depth_counts_staged_loads_and_declared_prefetch():
    instrs, labels = ss.parse_sass(LISTING)
    body = ss.main_loop(instrs, labels)
    assert ss.pipeline_depth(body, num_stages=3) == 1            # no LDGSTS: not staged
    assert ss.pipeline_depth(body, num_stages=1, prefetch=1) == 2
    staged = body + [ss.Instr(0x100, "", "LDGSTS.E.BYPASS.128", "[R1], desc[UR4][R2.64]", None)]
    assert ss.pipeline_depth(staged, num_stages=3) == 3


# A kernel whose loop is known: 4 fp32 per thread per iteration (BLOCK 128, 1
# warp), one 128-bit load and FFMAS dependent FFMAs per element.
KNOWN = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, {root!r})
    from scripts import sm90_sass as ss

    @triton.jit
    def known(x_ptr, y_ptr, n, BLOCK: tl.constexpr, FFMAS: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):
            v = tl.load(x_ptr + i + offs)
            for _ in tl.static_range(FFMAS):
                acc = acc * v + v
        tl.store(y_ptr + offs, acc)

    out = {{}}
    for ffmas in (2, 5):
        src = ASTSource(fn=known, signature={{"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32",
                                              "BLOCK": "constexpr", "FFMAS": "constexpr"}},
                        constexprs={{"BLOCK": 128, "FFMAS": ffmas}},
                        attrs={{(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={{"num_warps": 1, "num_stages": 1}})
        instrs, labels = ss.disassemble(c.asm["cubin"])
        out[ffmas] = ss.count(ss.main_loop(instrs, labels))
    print(json.dumps(out))
""")


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.fixture(scope="module")
def nvdisasm():
    try:
        return ss.find_tool("nvdisasm")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_counter_on_a_kernel_with_a_known_mix(nvdisasm, tmp_path):
    script = tmp_path / "known.py"
    script.write_text(KNOWN.format(root=str(ROOT)))
    env = dict(_compiled_env(), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    # ptxas unrolls this small loop (4 iterations per trip, seen with both
    # Tritons): the counts per iteration are what must be exact.
    for ffmas, c in counts.items():
        unroll = c["widths"].get("LDG.128", 0)
        assert unroll >= 1 and c["widths"] == {"LDG.128": unroll}, c["widths"]
        assert c["opcodes"].get("FFMA") == 4 * int(ffmas) * unroll, c["opcodes"]
        assert c["lsu"] == unroll and c["smem_bytes"] == 0
    # Three more FFMAs per element, nothing else changes.
    assert counts["5"]["instructions"] - counts["2"]["instructions"] == 12 * unroll


def test_ci_subset_report(nvdisasm, tmp_path):
    env = dict(_compiled_env(), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--subset", "--out", str(tmp_path / "r")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "compile-time estimates" in report["note"]
    (row,) = report["rows"]
    for key in ("kernel", "triton", "N", "K", "M", "dtype", "config", "thread_instr_per_weight",
                "issue_over_floor", "lsu_over_floor", "smem_over_floor", "bound_over_floor"):
        assert key in row, key
    assert (row["kernel"], row["N"], row["K"], row["M"], row["dtype"]) == ("gemv_fma", 8192, 8192, 1, "bf16")
    # The kernel's load pattern is described, and the description matches its loop's loads.
    assert row["l1_access_check"] == "ok" and row["l1_lines"] > 0
    names = ("issue", "issue_per_scheduler", "latency", "lsu", "smem", "l1")
    assert row["bound_over_floor"] == max(row[f"{k}_over_floor"] for k in names)
    assert row["bound_over_floor"] == row[f"{row['binding']}_over_floor"]
    # One trip decodes one tile: its global loads are at least its packed
    # bytes, and their count is one trip's described loads (l1_access_check
    # above), so ptxas did not unroll the loop.
    assert row["packed_bytes_per_trip"] <= row["loop_global_load_bytes"]
    assert "compile-time estimates" in (tmp_path / "r" / "report.md").read_text().lower()


def test_ci_subset_training_report(nvdisasm, tmp_path):
    env = dict(_compiled_env(), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--train", "--subset", "--out", str(tmp_path / "r")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "compile-time estimates" in report["note"]
    (row,) = report["rows"]
    for key in ("kernel", "op", "triton", "N", "K", "M", "dtype", "config", "strategy",
                "thread_instr_per_weight", "issue_over_floor", "lsu_over_floor", "smem_over_floor",
                "bound_over_floor", "floor_s", "estimate_s", "fused_s", "fused_over_floor",
                "dequant_s", "dequant_over_floor", "dequant_kernel_bound_over_floor", "overlap"):
        assert key in row, key
    assert (row["op"], row["N"], row["K"], row["M"], row["dtype"]) == ("forward", 4096, 4096, 4096, "bf16")
    import torch

    from qlora_triton import strategy

    with strategy.assume_gpu_kind("sm_90"):
        assert row["strategy"] == strategy.select_strategy(4096, 4096, 4096, torch.bfloat16,
                                                           torch.device("cpu"))
    # Each estimate is at least its floor; the chosen one is the row's bound.
    assert row["bound_over_floor"] >= 1 and row["fused_over_floor"] >= 1
    assert row["dequant_over_floor"] >= 1
    chosen = row["dequant_s"] if row["strategy"] == "dequant" else row["fused_s"]
    assert row["estimate_s"] == chosen
    assert row["bound_over_floor"] == pytest.approx(chosen / row["floor_s"], abs=1e-3)
    assert "compile-time estimate" in (tmp_path / "r" / "report.md").read_text().lower()


def test_assume_gpu_kind_answers_as_that_gpu_and_is_checked():
    import torch

    from qlora_triton import strategy

    cpu = torch.device("cpu")
    assert strategy.select_strategy(8192, 4096, 4096, torch.bfloat16, cpu) == "fused"  # CPU: no table
    with strategy.assume_gpu_kind("sm_90"):
        start = strategy.CROSSOVER["sm_90", "large", torch.bfloat16]
        assert strategy.select_strategy(start, 4096, 4096, torch.bfloat16, cpu) == "dequant"
        assert strategy.select_strategy(start - 1, 4096, 4096, torch.bfloat16, cpu) == "fused"
    assert strategy.select_strategy(8192, 4096, 4096, torch.bfloat16, cpu) == "fused"
    with pytest.raises(ValueError, match="kind must be a GPU kind like 'sm_90' or None, got 'cuda'"):
        with strategy.assume_gpu_kind("cuda"):
            pass
