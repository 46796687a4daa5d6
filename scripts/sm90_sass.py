"""A static sm_90 profile of the decode-size matmul kernels: compile the kernel
and config the dispatcher would pick, disassemble the cubin, count the main
loop's SASS by instruction class, and bound the loop's speed against the HBM
floor. No GPU needed; every number is a **compile-time estimate**.

Usage (TRITON_INTERPRET unset; each run profiles the installed Triton and
rewrites ``report.json`` / ``report.md`` from every ``triton-*.json`` in the
folder)::

    python scripts/sm90_sass.py --out benchmarks/results/sm90-sass-<date> [--subset] [--jobs N]

Method:

* Compile with ``triton.compile(ASTSource, target=GPUTarget("cuda", 90, 32))``
  (the Variants of scripts/sm90_compile.py: same signatures and launch
  specialization) and disassemble with the nvdisasm Triton bundles.
* Main loop: the body of the backward branch (``BRA`` to a lower address)
  enclosing the most instructions, i.e. the steady-state loop of the
  pipelined K (or N) loop. Every instruction between the branch target and
  the branch counts, predicated-off ones (``@!PT``) included (they still take
  an issue slot); instructions behind forward branches inside the body count
  too (an upper bound when a branch skips them).
* Per weight: warp-instructions of the body x num_warps x 32 threads / the
  weights one trip decodes (BLOCK_N x BLOCK_K: one iteration per trip).
  ptxas may unroll a small loop (tests/test_sm90_sass.py sees 4 iterations per
  trip in a toy kernel); each row carries ``loop_global_load_bytes`` beside
  ``packed_bytes_per_trip`` to show that the profiled GEMV loops are not
  unrolled (the CI test asserts it for its case).
* The bound model (:func:`bound_model`, the same for every decode and
  dequantize row): from the compiled kernel's registers, shared memory and
  warps per program and the launch grid, the programs resident per SM
  (registers allocated 8 per thread at a time of 64 K, 228 KB shared memory
  with 1 KB reserved per block, 64 warps, 32 blocks) and the waves; then the
  busiest SM's time under each bound, over the HBM floor (packed bytes +
  scale bytes at 4.3 TB/s; the dequantize also writes x's dtype): issue over
  all 4 schedulers (1.98 GHz, one warp-instruction per clock each); issue per
  scheduler (the busiest SM's warp-programs dealt to the schedulers that hold
  warps: a warp alone on its scheduler issues its stream back to back);
  memory latency (Little's law: bytes in flight per SM = resident programs x
  the main loop's global loads per trip x the pipeline depth, against 4.3 TB/s
  x 700 ns / 132 SMs = 23 KB; a trip costs latency / depth); the load/store
  unit (one instruction per clock per SM: global, shared, shuffle, atomic);
  shared memory (one 128-byte wavefront per clock per SM, no bank conflicts
  assumed); the L1/TEX lines (below). ``bound_over_floor`` is the largest,
  ``binding`` names it. The
  pipeline depth is 1 + the trips a kernel prefetches in registers (declared
  by its module, ``PREFETCH_TRIPS``) + ``num_stages - 1`` when the loop has
  asynchronous copies (LDGSTS). Not counted: the code outside the main loop
  (the split epilogue's partial sums among it) and L2 effects.
* The L1/TEX bound (``l1``; the H200 run of 2026-12-04 found both GEMVs bound
  there: ncu L1/TEX throughput 84-85 %, DRAM 18-26 %, issue 30-40 %). A warp's
  global load is served by the L1/TEX unit one 128-byte line at a time (one
  tag lookup and one data-stage wavefront per distinct line the 32 lanes
  touch; a coalesced 512-byte LDG.128 is 4 lines, the old GEMVs' 16-byte-
  per-row loads 16-32). Lines, not 32-byte sectors: the data stage moves up to
  128 bytes per wavefront, so a coalesced load's 16 sectors take 4 wavefronts,
  and in the scattered loads each lane's piece lies in one sector of its own
  line, where both counts agree. SASS has no addresses, so the lines come from
  a per-kernel description of each global load's pattern
  (:func:`access_lines`, the one place; a kernel module names its layout in
  ``L1_LAYOUT``), checked against the loop's LDG/LDGSTS count
  (``l1_access_check``); a kernel without a description counts its loads as
  coalesced (ceil(bytes / 128) lines each: a lower bound). Global stores
  pass the same data stage: a description lists them too (``Access.store``,
  checked against the STGs; the dequantize kernel's). Shared-memory
  wavefronts (the ``smem`` count) go through the same data stage and add to
  them. Rate: ``L1_CLOCKS_PER_LINE`` = 1.8 SM clocks per line per SM, fitted
  on ncu's elapsed cycles of the two measured kernels (28672x8192, bf16,
  blocksize 64, double quant): the M = 1 kernel 64x64 w1 SPLIT_K=8 (241.6
  lines per warp-trip x 448 warp-trips on the busiest SM = 108 k lines in
  196 k cycles: 1.81) and the M = 16 kernel 128x64 w4 s3 SPLIT_K=4 (171.8 x
  896 = 154 k lines in 273 k cycles: 1.77). At the model's 1.98 GHz that is
  98.4 us for the first (ncu 100.1, graph replay 97.3) and 140 us for the
  second (ncu 152.1, graph 150.1: that run's SM clock was 1.79 GHz, at which
  the same lines take 155 us). Over the whole H200 sweep at 8192x8192 and
  28672x8192 (64 tile/split points) the model is within -11..+15 % on 40; it
  under-estimates the rest by 1.17-2.2x (1-2 warps per scheduler: small splits,
  the 256-row tensor-core and 128-row FMA tiles), which the config picker
  covers with its measured 3-warp issue rate (tuned_sm90).

Training mode (``--train``; M = 64, 256, 4096, 8192 on 4096x4096, 8192x8192,
28672x8192, forward ``x[M, K] @ W^T`` and grad-input ``grad_y[M, N] @ W``):

* ``strategy``: what ``qlora_triton.strategy.select_strategy`` answers for the
  row on sm_90 (``strategy.assume_gpu_kind("sm_90")``: its table, no device).
* Fused estimate: compile the fused kernel with the config the launcher runs
  (the shipped sm_90 one; every autotune candidate is profiled beside it) and
  count its main loop. Per trip, one SM's time for each resource: tensor
  cores = the loop's HGMMA/HMMA flops at 790 TFLOP/s / 132 SMs (or the wgmma
  operands' shared-memory reads, when longer); decode = the largest of issue
  (4 schedulers), LSU and the other shared-memory traffic, as above. Decode and
  MMA overlap when the loop leaves wgmma groups in flight across iterations
  (its smallest ``WARPGROUP.DEPBAR.LE gsb0, N`` has N >= 1) or when two or more
  programs fit on an SM (registers, allocated 8 per thread at a time, of 64 K;
  228 KB shared memory with 1 KB reserved per block; 64 warps) and the grid
  has two per SM to give them: a trip then costs the largest of tensor,
  decode and all shared-memory traffic; otherwise tensor + decode. The kernel
  costs waves (ceil(programs / 132)) x trips x that, at least its bytes (packed
  weights and scales, x and y once) at 4.3 TB/s; the epilogue is not counted
  and HMMA is taken at the HGMMA rate (both optimistic).
* Dequant estimate: ``_nf4_dequantize_kernel`` profiled like a GEMV (it has no
  loop: the whole kernel per program), its bytes floor (packed + scales read,
  x's dtype written, at 4.3 TB/s) times its bound over that floor (at least
  1), plus cuBLAS at 790 TFLOP/s (the issue's assumption) or its own bytes at
  4.3 TB/s when more.
* ``floor_s``: the flops at 790 TFLOP/s, plus the dequantize's bytes at
  4.3 TB/s when the strategy is ``dequant``; ``bound_over_floor``: the chosen
  strategy's estimate over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import sm90_compile as sc  # noqa: E402

# H200 (sm_90): the figures of DESIGN.md.
SMS = 132
SCHEDULERS = 4
CLOCK_HZ = 1.98e9
HBM_BYTES_PER_S = 4.3e12
SMEM_BYTES_PER_CLOCK = 128
LINE_BYTES = 128                    # an L1/TEX cache line, one data-stage wavefront
L1_CLOCKS_PER_LINE = 1.8            # fitted on the H200's ncu cycles (module docstring)
ISSUE_PER_S = SMS * SCHEDULERS * CLOCK_HZ      # warp-instructions / s
LSU_PER_S = SMS * CLOCK_HZ                      # warp-instructions / s
SMEM_PER_S = SMS * CLOCK_HZ * SMEM_BYTES_PER_CLOCK  # bytes / s
SM_REGISTERS = 65536
SM_SHARED = 228 * 1024              # per SM; a block may take 227 KB, 1 KB is reserved per block
SM_MAX_WARPS = 64

# Llama-3-8B's projections (4096x4096, 1024x4096, 14336x4096, 4096x14336) and
# the 70B-sized ones.
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192),
          (8192, 28672)]
MS = [1, 4, 16]
# General decode path (K % blocksize != 0): one shape, K = 4096 + 8.
GENERAL_SHAPES = [(4096, 4104)]


# --------------------------------------------------------------------------- disassembly
def find_tool(name: str) -> str:
    """A CUDA binary tool bundled with Triton (``nvdisasm``, ``cuobjdump``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not bundled with this Triton ({path})")
    return str(path)


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str        # "" or e.g. "@P4", "@!PT"
    opcode: str      # with modifiers, e.g. "LDG.E.128"
    operands: str
    line: int | None  # source line (nvdisasm -g), if known

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_SRC = re.compile(r'//## File ".*", line (\d+)')
_TARGET = re.compile(r"`\((\.L_\w+)\)")


def disassemble(cubin: bytes) -> tuple[list[Instr], dict[str, int]]:
    """Instructions of the cubin's kernel and its labels' addresses."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([find_tool("nvdisasm"), "-c", "-g", str(path)], check=True,
                              capture_output=True, text=True).stdout
    return parse_sass(text)


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    instrs, labels, pending, line = [], {}, [], None
    for raw in text.splitlines():
        if m := _SRC.search(raw):
            line = int(m.group(1))
        elif m := _LABEL.match(raw):
            pending.append(m.group(1))
        elif m := _INSTR.search(raw):
            ins = Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                        m.group(4).strip(), line)
            for lab in pending:
                labels[lab] = ins.addr
            pending = []
            instrs.append(ins)
    return instrs, labels


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward-branch loop body."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    out = []
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "JMP") and (m := _TARGET.search(ins.operands)):
            target = labels.get(m.group(1))
            if target is not None and target <= ins.addr:
                out.append((index[target], i))
    return out


def main_loop(instrs: list[Instr], labels: dict[str, int]) -> list[Instr]:
    found = loops(instrs, labels)
    if not found:
        raise ValueError("no backward branch: the kernel has no loop")
    first, last = max(found, key=lambda fl: fl[1] - fl[0])
    return instrs[first:last + 1]


# --------------------------------------------------------------------------- classes
_CLASSES = [  # (class, opcodes); first match wins
    ("LDG", {"LDG"}), ("LDGSTS", {"LDGSTS"}), ("LDS", {"LDS"}), ("STS", {"STS"}),
    ("LDSM", {"LDSM"}), ("SHFL", {"SHFL"}), ("HMMA", {"HMMA"}), ("HGMMA", {"HGMMA"}),
    ("STG", {"STG", "ST"}), ("atomic", {"RED", "ATOM", "ATOMG", "ATOMS", "REDG"}),
    ("fp32", {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "MUFU"}),
    ("fp16x2", {"HFMA2", "HMUL2", "HADD2", "HMNMX2", "HSETP2"}),
    ("convert", {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"}),
    ("PRMT", {"PRMT"}), ("LOP3", {"LOP3"}), ("SHF", {"SHF"}), ("LEA", {"LEA"}),
    ("IMAD", {"IMAD"}), ("IADD", {"IADD3", "VIADD", "IADD"}),
    ("barrier", {"BAR", "DEPBAR", "LDGDEPBAR", "WARPSYNC", "SYNCS", "ARRIVES",
                 "WARPGROUP", "MEMBAR", "ERRBAR", "CCTL"}),
]
LSU_CLASSES = {"LDG", "LDGSTS", "LDS", "STS", "LDSM", "SHFL", "STG", "atomic"}
_SPILL = {"LDL", "STL"}


def instr_class(ins: Instr) -> str:
    if ins.pred == "@!PT":
        return "nop"  # never executes, still issued
    if ins.base in _SPILL:
        return "spill"
    for name, ops in _CLASSES:
        if ins.base in ops:
            return name
    return "other"


def access_bits(ins: Instr) -> int:
    """Bits per thread of a memory instruction (32 when the opcode says none)."""
    for part in ins.opcode.split(".")[1:]:
        if part in ("128", "64", "32"):
            return int(part)
        if part in ("U8", "S8"):
            return 8
        if part in ("U16", "S16"):
            return 16
    return 32


def smem_bytes(ins: Instr) -> int:
    """Shared-memory bytes one warp-instruction moves (an estimate)."""
    cls = instr_class(ins)
    if cls in ("LDS", "STS", "LDGSTS"):
        return access_bits(ins) // 8 * 32
    if cls == "LDSM":  # 8x8 16-bit matrices: .4 -> 4 of them (128 B each)
        last = ins.opcode.split(".")[-1]
        return 128 * (int(last) if last.isdigit() else 1)
    if cls == "HGMMA":
        # Operands read from shared memory through descriptors, per warp (the
        # 4 warps of a warpgroup each issue the instruction).
        m, n, k = (int(v) for v in re.search(r"(\d+)x(\d+)x(\d+)", ins.opcode).groups())
        elem = 4 if ".TF32" in ins.opcode else 2
        # "Rd, gdesc[..], Rc": A and B in shared memory (one descriptor pair);
        # "Rd, Ra, gdesc[..], Rc": A from registers.
        operands = [o.strip() for o in ins.operands.split(",")]
        a = m * k * elem if len(operands) > 1 and operands[1].startswith("gdesc") else 0
        return (a + n * k * elem) // 4
    return 0


def count(body: list[Instr]) -> dict:
    """Instruction classes of ``body``, memory widths, shared-memory bytes and
    wavefronts, LSU instructions (all per warp)."""
    classes: Counter = Counter()
    widths: Counter = Counter()
    opcodes: Counter = Counter()
    smem = wavefronts = lsu = global_loads = global_stores = coalesced_lines = 0
    for ins in body:
        cls = instr_class(ins)
        classes[cls] += 1
        opcodes[ins.opcode] += 1
        if cls in ("LDG", "LDGSTS", "LDS", "STS", "STG"):
            widths[f"{cls}.{access_bits(ins)}"] += 1
        if cls in ("LDG", "LDGSTS"):
            global_loads += 1
        if cls == "STG":
            global_stores += 1
        if cls in ("LDG", "LDGSTS", "STG", "atomic"):  # as if coalesced: the fewest lines
            coalesced_lines += max(1, math.ceil(access_bits(ins) * 32 // 8 / LINE_BYTES))
        if cls in LSU_CLASSES:
            lsu += 1
        b = smem_bytes(ins)
        smem += b
        if cls in ("LDS", "STS", "LDGSTS", "LDSM"):
            wavefronts += max(1, math.ceil(b / SMEM_BYTES_PER_CLOCK))
        elif cls == "HGMMA":
            wavefronts += math.ceil(b / SMEM_BYTES_PER_CLOCK)
    return {"instructions": len(body), "classes": dict(classes), "widths": dict(widths),
            "opcodes": dict(opcodes.most_common()), "smem_bytes": smem,
            "smem_wavefronts": wavefronts, "lsu": lsu, "global_loads": global_loads,
            "global_stores": global_stores, "coalesced_lines": coalesced_lines}


# --------------------------------------------------------------------------- the model
def floor_bytes_per_weight(blocksize: int, double_quant: bool, blocksize2: int = 256) -> float:
    """HBM bytes per weight: the packed nibble plus its share of the scales."""
    scales = (1 / blocksize + 4 / (blocksize * blocksize2)) if double_quant else 4 / blocksize
    return 0.5 + scales


def bounds(counts: dict, warps: int, weights_per_trip: int, floor_bytes: float) -> dict:
    per_weight = warps / weights_per_trip  # warp-instructions per weight, per body instruction
    floor_s = floor_bytes / HBM_BYTES_PER_S
    issue = counts["instructions"] * per_weight / ISSUE_PER_S / floor_s
    lsu = counts["lsu"] * per_weight / LSU_PER_S / floor_s
    smem = counts["smem_wavefronts"] * per_weight * SMEM_BYTES_PER_CLOCK / SMEM_PER_S / floor_s
    return {"thread_instr_per_weight": round(counts["instructions"] * per_weight * 32, 3),
            "lsu_instr_per_weight": round(counts["lsu"] * per_weight * 32, 3),
            "smem_bytes_per_weight": round(counts["smem_bytes"] * per_weight, 3),
            "issue_over_floor": round(issue, 3), "lsu_over_floor": round(lsu, 3),
            "smem_over_floor": round(smem, 3), "bound_over_floor": round(max(issue, lsu, smem), 3)}


# --------------------------------------------------------------------------- the bound model
MAX_PROGRAMS_PER_SM = 32            # resident thread blocks per SM (sm_90)
LATENCY_S = 700e-9                  # DRAM round trip under load (issue 22: 600-800 ns)


@dataclasses.dataclass(frozen=True)
class Launch:
    """What the bound model needs of one compiled kernel and its launch.

    ``loop_*`` are per warp and per trip of the main loop (one iteration);
    ``loop_load_bytes`` is the global bytes one trip of one *program* loads
    (all its warps); ``pipeline_depth`` how many trips of loads a program has
    in flight (1: each trip waits for its own loads)."""

    registers: int          # per thread, from ptxas
    shared: int             # bytes per program
    warps: int              # per program
    programs: int           # the grid
    trips: int              # main-loop trips per program
    loop_instructions: int  # warp-instructions per trip, per warp
    loop_lsu: int           # load/store-unit instructions per trip, per warp
    loop_smem_wavefronts: int  # shared-memory wavefronts per trip, per warp
    loop_load_bytes: int    # global bytes loaded per trip, per program
    pipeline_depth: int     # trips of loads in flight per program
    floor_s: float          # the kernel's HBM floor (its bytes at HBM_BYTES_PER_S)
    loop_l1_lines: float = 0.0  # L1/TEX lines per trip, per warp (l1_lines_per_trip)


BOUNDS = ("issue", "issue_per_scheduler", "latency", "lsu", "smem", "l1")


def programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """Programs of one kernel resident on an SM: registers (allocated 8 per
    thread at a time), shared memory (1 KB reserved per block), warps, and at
    most 32 blocks."""
    regs = -(-max(registers, 1) // 8) * 8 * warps * 32
    return max(0, min(SM_REGISTERS // regs, SM_SHARED // (shared + 1024), SM_MAX_WARPS // warps,
                      MAX_PROGRAMS_PER_SM))


def bound_model(launch: Launch, latency_s: float = LATENCY_S) -> dict:
    """The kernel's time on its busiest SM under each bound, over its floor.

    * occupancy: ``resident`` programs per SM (:func:`programs_per_sm`, at most
      the busiest SM's share of the grid), ``waves`` = that share / resident;
    * ``issue``: all four schedulers busy, one warp-instruction per clock each;
    * ``issue_per_scheduler``: the busiest SM's warp-programs dealt to the
      schedulers that hold warps (all 4, or fewer when fewer warps are
      resident); a scheduler issues at most one instruction per clock of the
      warps it holds, so one warp alone on a scheduler issues its stream back
      to back;
    * ``latency`` (Little's law): each SM keeps resident x loop_load_bytes x
      pipeline_depth bytes in flight, so a trip costs latency / depth and a
      program trips x latency / depth, per wave; against the floor, which
      needs HBM_BYTES_PER_S x latency / SMS (about 23 KB at 700 ns) per SM;
    * ``lsu``: one load/store-unit instruction per clock per SM;
    * ``smem``: one 128-byte wavefront per clock per SM;
    * ``l1``: the L1/TEX data stage, L1_CLOCKS_PER_LINE clocks per line
      (global lines and shared wavefronts, ``loop_l1_lines``).
    ``bound_over_floor`` is the largest and ``binding`` names it. The
    epilogue and the code outside the main loop are not counted."""
    if launch.programs < 1 or launch.trips < 1 or launch.floor_s <= 0:
        raise ValueError(f"launch: programs, trips and floor_s must be positive, got {launch}")
    occupancy = programs_per_sm(launch.registers, launch.warps, launch.shared)
    if occupancy < 1:
        raise ValueError(f"launch: no program fits an SM ({launch.registers} registers, "
                         f"{launch.shared} B shared, {launch.warps} warps)")
    busiest = -(-launch.programs // SMS)
    resident = min(occupancy, busiest)
    waves = -(-busiest // resident)
    warps_per_sm = resident * launch.warps
    warps_per_scheduler = -(-warps_per_sm // SCHEDULERS)
    # Schedulers that hold warps at all, and each one's share of the busiest
    # SM's warp-programs (dealt evenly as programs finish and new ones start).
    busy_schedulers = min(SCHEDULERS, warps_per_sm)
    programs_per_scheduler = -(-busiest * launch.warps // busy_schedulers)
    per_warp = launch.trips * launch.loop_instructions  # one warp's stream, one program
    work = busiest * launch.warps * launch.trips        # warp-trips on the busiest SM
    in_flight = resident * launch.loop_load_bytes * launch.pipeline_depth
    times = {
        "issue": work * launch.loop_instructions / (SCHEDULERS * CLOCK_HZ),
        "issue_per_scheduler": programs_per_scheduler * per_warp / CLOCK_HZ,
        "latency": waves * launch.trips * latency_s / launch.pipeline_depth,
        "lsu": work * launch.loop_lsu / CLOCK_HZ,
        "smem": work * launch.loop_smem_wavefronts / CLOCK_HZ,
        "l1": work * launch.loop_l1_lines * L1_CLOCKS_PER_LINE / CLOCK_HZ,
    }
    over = {k: round(t / launch.floor_s, 3) for k, t in times.items()}
    binding = max(BOUNDS, key=lambda k: over[k])
    return {"programs": launch.programs, "programs_per_sm_max": occupancy,
            "programs_per_sm": resident, "waves": waves, "warps_per_sm": warps_per_sm,
            "warps_per_scheduler": warps_per_scheduler,
            "warp_programs_per_scheduler": programs_per_scheduler,
            "bytes_in_flight_per_sm": in_flight,
            "bytes_needed_in_flight_per_sm": round(HBM_BYTES_PER_S * latency_s / SMS),
            "latency_ns": round(latency_s * 1e9),
            **{f"{k}_over_floor": v for k, v in over.items()},
            "bound_over_floor": over[binding], "binding": binding,
            "estimate_us": round(max(times[binding], launch.floor_s) * 1e6, 2)}


def pipeline_depth(body: list[Instr], num_stages: int, prefetch: int = 0) -> int:
    """Trips of loads a program has in flight: 1, plus ``prefetch`` trips the
    kernel loads ahead in registers itself (declared by the kernel), plus
    ``num_stages - 1`` when Triton's pipeliner staged the loop's loads
    (asynchronous copies, LDGSTS, in the loop)."""
    staged = any(instr_class(i) == "LDGSTS" for i in body)
    return 1 + prefetch + (max(0, num_stages - 1) if staged else 0)


def grid_factor(programs: int) -> float:
    """Busiest SM's share over the mean: 1.0 when programs spread evenly."""
    return round(math.ceil(programs / SMS) * SMS / programs, 3)


def global_load_bytes(body: list[Instr], warps: int) -> int:
    """Bytes the body's global loads (LDG, LDGSTS) fetch per trip, whole program:
    beside one iteration's packed bytes it shows that a trip is one iteration
    (Triton emits one per trip; ptxas did not unroll these loops)."""
    return sum(access_bits(i) // 8 * 32 * warps for i in body
               if instr_class(i) in ("LDG", "LDGSTS"))


# --------------------------------------------------------------------------- L1/TEX lines
# Global loads reach the L1/TEX unit as warp-instructions; each costs one
# data-stage wavefront per distinct 128-byte line its 32 lanes touch (module
# docstring). The SASS has no addresses, so each kernel's load pattern is
# described here, in one place, from the kernel's code and Triton's layout of
# each tile (TTGIR ``#blocked`` encodings, Triton 3.6); the kernel's module
# names the layout it uses in ``L1_LAYOUT`` (absent: "row_per_lane", the GEMVs
# up to 2026-12-04). ``access_lines`` returns the description;
# ``l1_lines_per_trip`` adds it up and checks the count of its loads against
# the loop's LDG/LDGSTS instructions.
@dataclasses.dataclass(frozen=True)
class Access:
    """One kind of global load (or store) of a kernel's main loop, per warp
    and trip."""

    operand: str          # "words", "absmax", "absmax2", "code2", "x", "code", "out"
    instructions: float   # warp-instructions per warp per trip
    lines: float          # distinct 128-byte lines one such instruction touches
    store: bool = False   # a global store (STG): through the same L1/TEX data stage


def _span_lines(rows: int, span: int, stride: int) -> int:
    """Lines that ``rows`` runs of ``span`` contiguous bytes, ``stride`` bytes
    apart, touch (runs aligned to their span: a run never straddles a line
    when span <= 128)."""
    if stride >= LINE_BYTES or rows == 1:
        return rows * max(1, math.ceil(span / LINE_BYTES))
    return max(1, math.ceil(((rows - 1) * stride + span) / LINE_BYTES))


def _scale_access(rows: int, blocks: int, instructions: float, K: int, blocksize: int,
                  double_quant: bool) -> list:
    """The block scales of ``rows`` rows x ``blocks`` consecutive blocks per
    warp-instruction: the stored scale (uint8 code, or fp32 absmax; a row's
    are K / blocksize entries apart); with double quantization the nested
    absmax2 (one fp32 per 256 blocks) and the code2 gather (a 256-entry fp32
    table, 1 KB = 8 lines; :func:`code2_lines`)."""
    per_row = K // blocksize
    if not double_quant:
        return [Access("absmax", instructions, _span_lines(rows, 4 * blocks, 4 * per_row))]
    nested = max(1, math.ceil(((rows - 1) * per_row + blocks) / 256 * 4 / LINE_BYTES))
    return [Access("absmax", instructions, _span_lines(rows, blocks, per_row)),
            Access("absmax2", instructions, nested),
            Access("code2", instructions, code2_lines(rows * blocks))]


def code2_lines(codes: int) -> float:
    """Expected distinct lines of the 1 KB code2 table that ``codes`` block
    codes fall in: 6 * (1 - 0.9 ** codes), fitted on quantized N(0, 0.02)
    weights (1024x8192, blocksize 64, double quant: 4.92 lines for the 16
    codes of 4 rows x 4 blocks, 5.87 for 32 rows of one block); the codes
    crowd into about 6 of the 8 lines. Real layers may spread wider (at most
    8)."""
    return round(min(8.0, codes, 6 * (1 - 0.9 ** codes)), 3)


def _fma_row_per_lane(kw: dict, warps: int, K: int, blocksize: int, double_quant: bool,
                      elem: int, M: int, version: str = "") -> list:
    """_nf4_gemv_fma_kernel up to 2026-12-04: a lane holds BLOCK_N / 32 whole
    rows; per 32-column run a 128-bit load per row (4 words), so one
    warp-instruction reads 16 bytes of each of 32 rows (K / 2 bytes apart:
    32 lines); one scale per row (32 rows per instruction); x's run as one
    element per lane (then broadcast through shared memory, in the smem
    count)."""
    bn, bk = kw["BLOCK_N"], kw["BLOCK_K"]
    per_lane = bn // 32
    return [Access("words", bk // 32 * per_lane, _span_lines(32, 16, K // 2)),
            *_scale_access(32, 1, per_lane, K, blocksize, double_quant),
            Access("x", bk // 32 * M, _span_lines(1, 32 * elem, 0))]


def _dot_row_per_lane(kw: dict, warps: int, K: int, blocksize: int, double_quant: bool,
                      elem: int, M: int, version: str = "") -> list:
    """_nf4_gemv_dot_kernel up to 2026-12-04: the words tile [BLOCK_K / 8,
    BLOCK_N] is blocked sizePerThread [4, 1], threadsPerWarp [BLOCK_K / 32,
    32 * 32 / BLOCK_K]: 16 bytes per lane, a row's BLOCK_K / 2 bytes across
    BLOCK_K / 32 lanes, so one instruction reads 32 * 32 / BLOCK_K rows (one
    line each); x^T [BLOCK_K, 16] as 16-byte pieces along K, each row of x
    (K * elem bytes apart) its own lines. The scales: one row per lane when a
    warp has 32 rows or more; else (the 64-row tile) Triton loads them in the
    wgmma accumulator's row layout, two rows per lane, 8 rows per
    instruction."""
    bn, bk = kw["BLOCK_N"], kw["BLOCK_K"]
    rows_per_instr = 32 * 32 // bk
    rows_per_warp = max(1, bn // warps)
    x_instr = max(1, math.ceil(16 * bk * elem / 512 / warps))
    x_lines = min(M, 16) * math.ceil(bk * elem / LINE_BYTES) / warps / x_instr
    scale_rows = 32 if rows_per_warp >= 32 else 8
    return [Access("words", max(1, rows_per_warp // rows_per_instr),
                   _span_lines(min(rows_per_instr, rows_per_warp), bk // 2, K // 2)),
            *_scale_access(scale_rows, 1, rows_per_warp // scale_rows, K, blocksize,
                           double_quant),
            Access("x", x_instr, max(1.0, x_lines))]


def _fma_lines(kw: dict, warps: int, K: int, blocksize: int, double_quant: bool, elem: int,
               M: int, version: str = "") -> list:
    """_nf4_gemv_fma_kernel from 2026-12-04b ("lines"): LPR = BLOCK_K / 32
    lanes per row, each on a 16-byte piece (4 words), consecutive lanes on
    consecutive pieces: one warp load reads RPL = 32 / LPR rows x BLOCK_K / 2
    contiguous bytes (at BLOCK_K 256: 4 rows x 128 B, 4 lines), one per row
    a lane holds (RPLANE = BLOCK_N / RPL); the stored scales in the same
    lanes, one per piece (RPL rows x BLOCK_K / blocksize blocks). x, on the
    profiled shapes' whole trips (EVEN_K, unmasked): Triton 3.6 loads each
    lane's 16-byte pieces, 4 (bf16/fp16) or 8 (fp32) loads per trip, each
    touching the chunk of every piece (the trip's BLOCK_K x elem bytes);
    later Tritons (3.9) load the trip's BLOCK_K columns once, 16 bytes per
    lane (512 B, 4 lines, per load), and hand them to the lanes through
    shared memory (in the smem count)."""
    bn, bk = kw["BLOCK_N"], kw["BLOCK_K"]
    lpr = bk // 32
    rpl = 32 // lpr
    rows_per_lane = bn // rpl
    if version.startswith("3.6."):
        x = Access("x", 4 * max(1, 8 * elem // 16) * M, min(lpr, math.ceil(bk * elem / LINE_BYTES)))
    else:
        x = Access("x", max(1, bk * elem // 512) * M, math.ceil(min(512, bk * elem) / LINE_BYTES))
    return [Access("words", rows_per_lane, _span_lines(rpl, bk // 2, K // 2)),
            *_scale_access(rpl, max(1, bk // blocksize), rows_per_lane, K, blocksize,
                           double_quant),
            x]


def _dequantize_rows(kw: dict, warps: int, K: int, blocksize: int, double_quant: bool,
                     elem: int, M: int, version: str = "") -> list:
    """_nf4_dequantize_kernel ("rows"; no loop: the whole program is one
    trip): ``kw["ROWS"]`` rows of ROW = min(64, blocksize) consecutive
    elements, contiguous in memory, so the program's packed bytes and its
    outputs are each one contiguous run, loaded and stored 16 bytes per lane
    (512 B, 4 lines, per warp instruction). Each nibble's code is a gather
    ``tl.load(code_ptr + nibble)``: one load per weight and lane, all 32 lanes
    within the 64-byte codebook (1 line). One scale per row, 32 rows per
    instruction (32 consecutive rows lie in at most 32 consecutive blocks: 1
    line of uint8 codes or fp32 absmax; their nested absmax2, 1 line; the
    code2 gather of 32 codes), and the double-quant offset (1 load, 1 line)."""
    rows, row = kw["ROWS"], min(64, blocksize)
    packed = rows * row // 2 // warps        # bytes per warp
    scales = max(1, rows // (32 * warps))    # instructions per warp
    acc = [Access("words", max(1, packed // 512), 4),
           Access("code", 2 * packed / 32, 1)]
    if double_quant:
        acc += [Access("absmax", scales, 1), Access("absmax2", scales, 1),
                Access("code2", scales, code2_lines(32)), Access("offset", 1, 1)]
    else:
        acc += [Access("absmax", scales, 1)]
    return acc + [Access("out", max(1, 2 * packed * elem // 512), 4, store=True)]


def _dot_fragment(kw: dict, warps: int, K: int, blocksize: int, double_quant: bool, elem: int,
                  M: int, version: str = "") -> list:
    """_nf4_gemv_dot_kernel from 2026-12-04c ("fragment"): the words in the
    wgmma A fragment's lanes: lane l reads 16 bytes (4 words) of rows l / 4
    (+ 8, + 64, ...) per run, the 4 lanes of a quad and their H = BLOCK_K /
    128 runs a row's BLOCK_K / 2 bytes, so one 128-bit warp load reads 8 rows
    (8 lines), 2 * H * BLOCK_N / 64 of them per lane and trip; the stored
    scales in the same lanes, one per run (per lane when its runs share a
    block): 8 rows x the quad's blocks per instruction; x [16, BLOCK_K] in
    column order, a warp's 16 / warps rows of BLOCK_K * elem bytes (rows
    past M masked)."""
    bn, bk = kw["BLOCK_N"], kw["BLOCK_K"]
    h = bk // 128
    sh = h if blocksize < 32 * h else 1
    per_lane = max(1, 2 * bn // 16 // warps)  # rows per lane (16 per warp, 2 per lane)
    blocks = max(1, 4 * 32 * h // max(blocksize, 32 * h))
    x_instr = max(1, math.ceil(16 * bk * elem / 512 / warps))
    x_lines = min(M, 16) * math.ceil(bk * elem / LINE_BYTES) / warps / x_instr
    return [Access("words", h * per_lane, _span_lines(8, bk // 2, K // 2)),
            *_scale_access(8, blocks, sh * per_lane, K, blocksize, double_quant),
            Access("x", x_instr, max(1.0, x_lines))]


ACCESS = {("_nf4_gemv_fma_kernel", "row_per_lane"): _fma_row_per_lane,
          ("_nf4_gemv_dot_kernel", "row_per_lane"): _dot_row_per_lane,
          ("_nf4_gemv_fma_kernel", "lines"): _fma_lines,
          ("_nf4_dequantize_kernel", "rows"): _dequantize_rows,
          ("_nf4_gemv_dot_kernel", "fragment"): _dot_fragment}


def access_lines(kernel: str, layout: str, kw: dict, warps: int, K: int, blocksize: int,
                 double_quant: bool, elem: int, M: int, version: str | None = None) -> list | None:
    """The described global loads of ``kernel``'s main loop (None: no
    description, the loads count as coalesced), as Triton ``version`` (the
    installed one by default) lowers them."""
    fn = ACCESS.get((kernel, layout))
    if fn is None:
        return None
    if version is None:
        import triton

        version = triton.__version__
    return fn(kw, warps, K, blocksize, double_quant, elem, M, version)


def l1_lines_per_trip(loop: dict, accesses: list | None) -> dict:
    """Lines per warp and trip through the L1/TEX data stage: the described
    global loads and stores (else the loop's loads and stores as if
    coalesced) plus the shared-memory wavefronts; ``l1_access_check``
    compares the described loads' and stores' counts with the loop's
    LDG/LDGSTS and STG instructions."""
    if accesses is None:
        glob, check = float(loop["coalesced_lines"]), "no description: loads counted as coalesced"
    else:
        glob = sum(a.instructions * a.lines for a in accesses)
        loads = sum(a.instructions for a in accesses if not a.store)
        stores = sum(a.instructions for a in accesses if a.store)
        have = loop.get("global_stores", 0)
        check = ("ok" if abs(loads - loop["global_loads"]) < 1e-6 and abs(stores - have) < 1e-6
                 else f"described {loads:g} global loads and {stores:g} stores per warp-trip, the "
                 f"loop has {loop['global_loads']} and {have}")
    return {"l1_global_lines": round(glob, 3), "l1_lines": round(glob + loop["smem_wavefronts"], 3),
            "l1_access_check": check,
            "l1_accesses": ([dataclasses.asdict(a) for a in accesses] if accesses else [])}


def _layout(v) -> str:
    """The load layout ``v``'s kernel module declares (``L1_LAYOUT``)."""
    import importlib

    return getattr(importlib.import_module(v.module), "L1_LAYOUT", {}).get(v.kernel, "row_per_lane")


# --------------------------------------------------------------------------- what runs
@dataclasses.dataclass
class Case:
    """One report row's launch: a weight shape, rows of x, x's dtype, decode path;
    ``kernel`` "matmul" (the GEMV the launcher picks for M) or "dequantize" (the
    ``dequant`` strategy's first half, M unused)."""

    N: int
    K: int
    M: int
    dtype: str = "bf16"
    aligned: bool = True
    blocksize: int = 64
    double_quant: bool = True
    kernel: str = "matmul"


def cases(subset: bool = False, dtypes: tuple = ("bf16",)) -> list[Case]:
    if subset:
        return [Case(8192, 8192, 1)]
    out = [Case(N, K, M, dt) for dt in dtypes for N, K in SHAPES for M in MS]
    out += [Case(N, K, M, aligned=False) for N, K in GENERAL_SHAPES for M in MS]
    out += [Case(N, K, 0, dt, kernel="dequantize") for dt in dtypes for N, K in SHAPES]
    return out


def _kernel_module(name: str):
    """The ops module that defines kernel ``name`` (the matmul kernels moved
    between modules over time; the profile finds them wherever they are)."""
    import importlib

    for mod in ("qlora_triton.ops.gemv", "qlora_triton.ops.gemm", "qlora_triton.ops.matmul",
                "qlora_triton.ops.dequantize"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, name):
            return m
    raise LookupError(f"no ops module defines {name}")


def picks(case: Case) -> tuple[str, str, list]:
    """(family, kernel attribute, configs) the package runs for ``case`` on an
    H200: the launcher's kernel and its shipped config."""
    if case.kernel == "dequantize":
        return "dequantize", "_nf4_dequantize_kernel", [None]
    from qlora_triton.strategy import GEMV_MAX_M

    if case.M > GEMV_MAX_M:  # the table's "gemv" rows (qlora_triton.strategy)
        raise ValueError(f"M={case.M}: the profile covers the GEMVs only")
    if case.aligned:
        from qlora_triton.ops import tuned_sm90

        name = "fma" if case.M <= getattr(tuned_sm90, "GEMV_FMA_MAX_M", 1) else "dot"
        return (f"gemv_{name}", f"_nf4_gemv_{name}_kernel",
                [tuned_sm90.gemv_config(name, case.N, case.K, case.blocksize)])
    import torch

    mm = _kernel_module("_nf4_gemv_kernel")
    if hasattr(mm, "_prune_gemv"):  # before issue 22: every config its pruner keeps
        saved = mm._num_sms
        mm._num_sms = lambda device: SMS
        try:
            kept = mm._prune_gemv(mm._gemv_configs(interpret=False), {}, N=case.N, K=case.K,
                                  BLOCKSIZE=case.blocksize, ALIGNED=case.aligned,
                                  y_ptr=torch.empty(0))
        finally:
            mm._num_sms = saved
        return "gemv", "_nf4_gemv_kernel", kept
    from qlora_triton.ops import tuned_sm90

    return "gemv", "_nf4_gemv_kernel", [tuned_sm90.general_config("gemv", case.N, case.K)]


def variant(family: str, kernel: str, cfg, case: Case) -> "sc.Variant":
    if family == "dequantize":
        return dequantize_variant(case)
    if family in ("gemv_fma", "gemv_dot"):
        import triton

        (v,) = sc.gemv_words_variants(family[5:], [cfg], [case.dtype], [case.double_quant], [False],
                                      rows_opts=(triton.next_power_of_2(case.M),),
                                      blocksize=case.blocksize)
        return v
    (v,) = sc._matmul_variants(kernel, family, [cfg], [case.dtype], [case.aligned],
                               [case.double_quant], [False])
    return v


def programs(cfg, case: Case) -> int:
    if cfg is None:  # the dequantize kernel: one tile of PAIRS bytes per program
        return math.ceil(math.ceil(case.N * case.K / 2) / _dequantize_pairs())
    kw = cfg.kwargs
    return math.ceil(case.N / kw["BLOCK_N"]) * kw.get("SPLIT_K", 1)


def trips(cfg, case: Case) -> int:
    """Main-loop trips of one program: its split of K in BLOCK_K steps."""
    if cfg is None:
        return 1
    kw = cfg.kwargs
    return math.ceil(math.ceil(case.K / kw["BLOCK_K"]) / kw.get("SPLIT_K", 1))


def _dequantize_kw() -> dict:
    """The dequantize kernel's launch meta-parameters (its access description's ``kw``)."""
    from qlora_triton.ops import dequantize as dq_mod

    return {"ROWS": dq_mod._ROWS}


def _dequantize_pairs() -> int:
    """Packed bytes one dequantize program decodes (element pairs)."""
    from qlora_triton.ops import dequantize as dq_mod

    if hasattr(dq_mod, "_PAIRS"):  # before issue 22
        return dq_mod._PAIRS
    return dq_mod._ROWS * 64 // 2  # ROWS rows of 64 elements (blocksize >= 64)


def _prefetch(v: "sc.Variant") -> int:
    """Trips a kernel loads ahead in registers itself, as its module declares
    (``PREFETCH_TRIPS``; 0 when it declares nothing)."""
    import importlib

    return getattr(importlib.import_module(v.module), "PREFETCH_TRIPS", {}).get(v.kernel, 0)


# --------------------------------------------------------------------------- profile
def profile_variant(v: "sc.Variant", whole: bool = False) -> dict:
    """Compile ``v``, count its main loop (``whole``: every instruction, for a
    loop-free kernel); per-trip facts (no shape yet)."""
    c, log = sc.compile_kernel(v)
    instrs, labels = disassemble(c.asm["cubin"])
    body = instrs if whole else main_loop(instrs, labels)
    usage = sc.parse_ptxas_log(log)
    lines = Counter(i.line for i in body)
    return {"label": v.label, "num_warps": v.num_warps, "num_stages": v.num_stages,
            "registers": usage["registers"],
            "spill_stores": usage["spill_stores"], "shared": int(c.metadata.shared),
            "kernel_instructions": len(instrs),
            "loops": [b - a + 1 for a, b in loops(instrs, labels)],
            "layout": _layout(v),
            "loop": count(body), "loop_global_load_bytes": global_load_bytes(body, v.num_warps),
            "pipeline_depth": 1 if whole else pipeline_depth(body, v.num_stages, _prefetch(v)),
            "loop_source_lines": {str(k): n for k, n in lines.most_common(12)}}


def _profile_worker(job):
    v, whole = job
    try:
        return profile_variant(v, whole)
    except Exception as e:  # noqa: BLE001 - a failure is a row, not a crash
        return {"label": v.label, "error": f"{type(e).__name__}: {e}"[-2000:]}


def row(case: Case, family: str, kernel: str, cfg, prof: dict, triton_version: str) -> dict:
    deq = cfg is None
    out = {"kernel": family, "triton": triton_version, "N": case.N, "K": case.K, "M": case.M,
           "dtype": case.dtype, "path": "aligned" if case.aligned else "general",
           "blocksize": case.blocksize, "double_quant": case.double_quant,
           "config": prof["label"].split(f" {case.dtype} ")[0], "kernel_fn": kernel}
    out["config"] = out["config"].split(" rows=")[0].split(f" {case.dtype}")[0]
    if deq:
        out["config"] = f"w{prof.get('num_warps')} {2 * _dequantize_pairs()} weights/program"
    if "error" in prof:
        return {**out, "error": prof["error"]}
    fb = floor_bytes_per_weight(case.blocksize, case.double_quant)
    if deq:  # it also writes every weight in x's dtype
        fb += _DTYPE_BYTES[case.dtype]
    weights = 2 * _dequantize_pairs() if deq else cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"]
    p = programs(cfg, case)
    floor_s = case.N * case.K * fb / HBM_BYTES_PER_S
    per_weight = bounds(prof["loop"], prof["num_warps"], weights, fb)
    accesses = access_lines(
        kernel, prof.get("layout", "row_per_lane"), _dequantize_kw() if deq else cfg.kwargs,
        prof["num_warps"], case.K, case.blocksize, case.double_quant, _DTYPE_BYTES[case.dtype],
        case.M)
    l1 = l1_lines_per_trip(prof["loop"], accesses)
    model = bound_model(Launch(
        registers=prof["registers"], shared=prof["shared"], warps=prof["num_warps"], programs=p,
        trips=trips(cfg, case), loop_instructions=prof["loop"]["instructions"],
        loop_lsu=prof["loop"]["lsu"], loop_smem_wavefronts=prof["loop"]["smem_wavefronts"],
        loop_load_bytes=prof["loop_global_load_bytes"], pipeline_depth=prof["pipeline_depth"],
        floor_s=floor_s, loop_l1_lines=l1["l1_lines"]))
    out.update({k: per_weight[k] for k in ("thread_instr_per_weight", "lsu_instr_per_weight",
                                           "smem_bytes_per_weight")})
    out.update(l1, l1_lines_per_weight=round(l1["l1_lines"] * prof["num_warps"] / weights, 5),
               layout=prof.get("layout"))
    out.update(model, weights_per_trip=weights, trips=trips(cfg, case),
               loop_instructions=prof["loop"]["instructions"],
               num_warps=prof["num_warps"], num_stages=prof.get("num_stages"),
               pipeline_depth=prof["pipeline_depth"], registers=prof["registers"],
               spill_stores=prof["spill_stores"], shared=prof["shared"],
               floor_bytes_per_weight=round(fb, 5), floor_us=round(floor_s * 1e6, 3),
               grid_factor=grid_factor(p),
               packed_bytes_per_trip=weights // 2,
               loop_global_load_bytes=prof["loop_global_load_bytes"],
               classes=prof["loop"]["classes"], widths=prof["loop"]["widths"],
               smem_bytes_per_trip=prof["loop"]["smem_bytes"], loop_lsu=prof["loop"]["lsu"],
               loops=prof["loops"], loop_source_lines=prof["loop_source_lines"])
    return out


def profile(selected: list[Case], jobs: int = 1) -> list[dict]:
    """One row per case: the best kept config (lowest bound, then grid factor),
    with every kept config's figures under ``kept``."""
    import triton

    sc._require_compiled_mode()
    plans = []
    todo: dict[str, tuple] = {}
    for case in selected:
        family, kernel, configs = picks(case)
        vs = [(cfg, variant(family, kernel, cfg, case)) for cfg in configs]
        plans.append((case, family, kernel, vs))
        for _, v in vs:
            todo.setdefault(v.label, (v, family == "dequantize"))
    labels = list(todo)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            profs = dict(zip(labels, pool.map(_profile_worker, [todo[k] for k in labels])))
    else:
        profs = {k: _profile_worker(todo[k]) for k in labels}
    rows = []
    for case, family, kernel, vs in plans:
        kept = [row(case, family, kernel, cfg, profs[v.label], triton.__version__) for cfg, v in vs]
        good = [r for r in kept if "error" not in r]
        best = min(good, key=lambda r: r["bound_over_floor"]) if good else kept[0]
        summary = ["config", "thread_instr_per_weight", "bound_over_floor", "binding"]
        rows.append({**best, "kept_configs": len(kept),
                     "kept": [{k: r.get(k) for k in summary} for r in kept]})
    return rows


# --------------------------------------------------------------------------- training shapes
TENSOR_FLOPS = 790e12               # bf16 dense, measured on the H200 (issue 12's assumption)
SM_FLOPS = TENSOR_FLOPS / SMS
TRAIN_SHAPES = [(4096, 4096), (8192, 8192), (28672, 8192)]
TRAIN_MS = [64, 256, 4096, 8192]
TRAIN_OPS = ("forward", "grad_input")
# The dequantize kernel writes x's dtype: bytes per weight read and written.
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass
class TrainCase:
    """One training-shape row: W [N, K], M rows, the forward (x[M, K] @ W^T) or
    grad-input (grad_y[M, N] @ W) product."""

    N: int
    K: int
    M: int
    op: str = "forward"
    dtype: str = "bf16"
    blocksize: int = 64
    double_quant: bool = True


def train_cases(subset: bool = False) -> list[TrainCase]:
    if subset:
        return [TrainCase(4096, 4096, 4096, "forward")]
    return [TrainCase(N, K, M, op) for op in TRAIN_OPS for N, K in TRAIN_SHAPES for M in TRAIN_MS]


def chosen_strategy(case: TrainCase, kind: str = "sm_90") -> str:
    """What :func:`qlora_triton.strategy.select_strategy` picks for ``case`` on
    a GPU of ``kind`` (its table, assumed for this device-less machine)."""
    import torch

    from qlora_triton import strategy

    if strategy.env_strategy() is not None:
        raise RuntimeError(f"{strategy.ENV_VAR} is set: the profile reports the table's choice")
    with strategy.assume_gpu_kind(kind):
        return strategy.select_strategy(case.M, case.N, case.K, getattr(torch, _TORCH_DTYPES[case.dtype]),
                                        torch.device("cpu"), op=case.op)


def fused_kernel(case: TrainCase) -> tuple[str, str]:
    """(family, kernel) of the fused strategy: the word-decoding kernels when
    K % blocksize == 0, else the per-element decode."""
    words = case.K % case.blocksize == 0
    if case.op == "forward":
        return ("gemm_words", "_nf4_gemm_words_kernel") if words else ("gemm", "_nf4_gemm_kernel")
    return (("grad_input_words", "_nf4_grad_input_words_kernel") if words
            else ("grad_input", "_nf4_grad_input_kernel"))


def fused_configs(case: TrainCase) -> tuple:
    """(the config the launcher runs on sm_90, every autotune candidate of
    QLORA_TRITON_AUTOTUNE=1 its pruner keeps)."""
    from qlora_triton.ops import tuned_sm90

    family, _ = fused_kernel(case)
    if family.endswith("_words"):
        fp32 = case.dtype == "fp32"
        kept = [c for c in tuned_sm90.gemm_configs(case.op)
                if tuned_sm90.gemm_allowed(c, case.blocksize, fp32)]
        return (tuned_sm90.gemm_config(case.op, case.M, case.N, case.K, case.blocksize, fp32),
                [c for c in kept if c.kwargs["BLOCK_K"] == min(64, case.blocksize)])
    return (tuned_sm90.general_config(case.op, case.N, case.K),
            tuned_sm90.general_configs(case.op))


def fused_variant(case: TrainCase, cfg) -> "sc.Variant":
    family, kernel = fused_kernel(case)
    if family.endswith("_words"):
        (v,) = sc.words_matmul_variants(family, [cfg], [case.dtype], [case.double_quant],
                                        blocksize=case.blocksize)
        return v
    (v,) = sc._matmul_variants(kernel, family, [cfg], [case.dtype], [False], [case.double_quant],
                               [False] if family == "gemm" else [None])
    return v


def dequantize_variant(case) -> "sc.Variant":
    return sc.dequantize_variant(case.dtype, case.blocksize, case.double_quant)


def mma_flops(body: list[Instr], warps: int) -> int:
    """Flops the tensor-core instructions of ``body`` do in one program: an
    HGMMA (2 m n k) per warpgroup, an HMMA (``HMMA.16816``: m16 n8 k16) per warp."""
    out = 0
    for ins in body:
        cls = instr_class(ins)
        if cls == "HGMMA":
            m, n, k = (int(v) for v in re.search(r"(\d+)x(\d+)x(\d+)", ins.opcode).groups())
            out += 2 * m * n * k * warps // 4
        elif cls == "HMMA":
            shape = ins.opcode.split(".")[1]  # e.g. "16816"
            m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])
            out += 2 * m * n * k * warps
    return out


def wgmma_wait(body: list[Instr]) -> int | None:
    """The smallest count of ``WARPGROUP.DEPBAR.LE gsb0, N`` in the loop (wgmma
    groups left in flight): 0 waits for this iteration's MMA before the next
    decode; None when the loop has no wait."""
    waits = [int(m.group(1), 0) for i in body if i.opcode.startswith("WARPGROUP.DEPBAR")
             if (m := re.search(r"gsb0,\s*(0x[0-9a-f]+|\d+)", i.operands))]
    return min(waits) if waits else None


def profile_loop_kernel(v: "sc.Variant") -> dict:
    """``profile_variant`` plus the tensor-core facts of the main loop."""
    c, log = sc.compile_kernel(v)
    instrs, labels = disassemble(c.asm["cubin"])
    body = main_loop(instrs, labels)
    usage = sc.parse_ptxas_log(log)
    counts = count(body)
    hgmma_smem = sum(smem_bytes(i) for i in body if instr_class(i) == "HGMMA")
    return {"label": v.label, "num_warps": v.num_warps, "registers": usage["registers"],
            "spill_stores": usage["spill_stores"], "shared": int(c.metadata.shared),
            "kernel_instructions": len(instrs), "loop": counts,
            "loop_global_load_bytes": global_load_bytes(body, v.num_warps),
            "mma_flops": mma_flops(body, v.num_warps), "hgmma_smem_bytes_per_warp": hgmma_smem,
            "wgmma_wait": wgmma_wait(body)}


def profile_whole_kernel(v: "sc.Variant") -> dict:
    """A loop-free kernel (the dequantize: one tile per program): every
    instruction of the kernel counts once per program."""
    return profile_variant(v, whole=True)


def _train_worker(job):
    kind, v = job
    try:
        return profile_loop_kernel(v) if kind == "loop" else profile_whole_kernel(v)
    except Exception as e:  # noqa: BLE001 - a failure is a row, not a crash
        return {"label": v.label, "error": f"{type(e).__name__}: {e}"[-2000:]}


def fused_estimate(case: TrainCase, cfg, prof: dict) -> dict:
    """The fused kernel's time for ``case`` from its loop (the model of the
    training mode, module docstring)."""
    kw = cfg.kwargs
    warps = prof["num_warps"]
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    out_cols, red, red_block = ((case.N, case.K, bk) if case.op == "forward"
                                else (case.K, case.N, bn))
    out_block = bn if case.op == "forward" else bk
    loop = prof["loop"]
    flops_trip = prof["mma_flops"]
    if flops_trip != 2 * bm * bn * bk:
        raise ValueError(f"{prof['label']}: the loop's HGMMAs do {flops_trip} flops per trip, "
                         f"the tile {2 * bm * bn * bk}: a trip is not one iteration")
    mma_smem_s = prof["hgmma_smem_bytes_per_warp"] * warps / SMEM_BYTES_PER_CLOCK / CLOCK_HZ
    smem_s = loop["smem_wavefronts"] * warps / CLOCK_HZ
    t_mma = max(flops_trip / SM_FLOPS, mma_smem_s)
    t_issue = loop["instructions"] * warps / SCHEDULERS / CLOCK_HZ
    t_lsu = loop["lsu"] * warps / CLOCK_HZ
    t_dec = max(t_issue, t_lsu, smem_s - mma_smem_s)
    resident = programs_per_sm(prof["registers"], warps, prof["shared"])
    split = kw.get("SPLIT_K", kw.get("SPLIT_N", 1))
    programs = math.ceil(case.M / bm) * math.ceil(out_cols / out_block) * split
    wait = prof["wgmma_wait"]
    overlap = (wait is not None and wait >= 1) or (resident >= 2 and programs >= 2 * SMS)
    t_trip = max(t_mma, t_dec, smem_s) if overlap else t_mma + t_dec
    trips = math.ceil(math.ceil(red / red_block) / split)
    compute_s = math.ceil(programs / SMS) * trips * t_trip
    elem = _DTYPE_BYTES[case.dtype]
    fb = floor_bytes_per_weight(case.blocksize, case.double_quant)
    # A split writes fp32 partial sums and reads them back once.
    partial = 2 * 4 * split * case.M * out_cols if split > 1 else 0
    bytes_s = (case.N * case.K * fb + case.M * (case.N + case.K) * elem + partial) / HBM_BYTES_PER_S
    fused_s = max(compute_s, bytes_s)
    flops_s = 2 * case.M * case.N * case.K / TENSOR_FLOPS
    weights = bn * bk
    per = warps * 32 / weights
    return {"config": prof["label"].split(f" {case.dtype} ")[0], "num_warps": warps,
            "mma": "HGMMA" if "HGMMA" in loop["classes"] else "HMMA",
            "registers": prof["registers"], "spill_stores": prof["spill_stores"],
            "shared": prof["shared"], "programs_per_sm": resident, "programs": programs,
            "grid_factor": grid_factor(programs), "trips": trips,
            "wgmma_wait": wait, "overlap": overlap,
            "weights_per_trip": weights, "loop_instructions": loop["instructions"],
            "thread_instr_per_weight": round(loop["instructions"] * per, 3),
            "lsu_instr_per_weight": round(loop["lsu"] * per, 3),
            "smem_bytes_per_weight": round(loop["smem_bytes"] * warps / weights, 3),
            # Each resource's time per trip over the trip's tensor-core time at peak.
            "issue_over_floor": round(t_issue * SM_FLOPS / flops_trip, 3),
            "lsu_over_floor": round(t_lsu * SM_FLOPS / flops_trip, 3),
            "smem_over_floor": round(smem_s * SM_FLOPS / flops_trip, 3),
            "trip_us": {"mma": round(t_mma * 1e6, 4), "decode": round(t_dec * 1e6, 4),
                        "issue": round(t_issue * 1e6, 4), "lsu": round(t_lsu * 1e6, 4),
                        "smem": round(smem_s * 1e6, 4), "trip": round(t_trip * 1e6, 4)},
            "fused_s": fused_s, "fused_over_floor": round(fused_s / flops_s, 3),
            "fused_tensor_fraction": round(flops_s / fused_s, 3),
            "classes": loop["classes"], "widths": loop["widths"]}


def dequantize_estimate(case: TrainCase, prof: dict) -> dict:
    """The dequant strategy's time: the dequantize kernel (its HBM floor times
    its bound over that floor, at least 1) plus cuBLAS at the tensor peak (or
    its own bytes, when more)."""

    elem = _DTYPE_BYTES[case.dtype]
    fb = floor_bytes_per_weight(case.blocksize, case.double_quant) + elem
    weights = case.N * case.K
    deq_floor_s = weights * fb / HBM_BYTES_PER_S
    b = bounds(prof["loop"], prof["num_warps"], 2 * _dequantize_pairs(), fb)
    b.update(bound_model(Launch(
        registers=prof["registers"], shared=prof["shared"], warps=prof["num_warps"],
        programs=math.ceil(math.ceil(weights / 2) / _dequantize_pairs()), trips=1,
        loop_instructions=prof["loop"]["instructions"], loop_lsu=prof["loop"]["lsu"],
        loop_smem_wavefronts=prof["loop"]["smem_wavefronts"],
        loop_load_bytes=prof["loop_global_load_bytes"], pipeline_depth=1, floor_s=deq_floor_s,
        loop_l1_lines=l1_lines_per_trip(prof["loop"], access_lines(
            "_nf4_dequantize_kernel", prof.get("layout", "row_per_lane"), _dequantize_kw(),
            prof["num_warps"], case.K, case.blocksize, case.double_quant, elem, 0))["l1_lines"])))
    deq_s = deq_floor_s * max(1.0, b["bound_over_floor"])
    flops_s = 2 * case.M * case.N * case.K / TENSOR_FLOPS
    cublas_s = max(flops_s, (weights + case.M * (case.N + case.K)) * elem / HBM_BYTES_PER_S)
    total = deq_s + cublas_s
    return {"dequant_kernel": {"config": prof["label"], **b, "registers": prof["registers"],
                               "spill_stores": prof["spill_stores"],
                               "floor_bytes_per_weight": round(fb, 5)},
            "dequant_kernel_bound_over_floor": b["bound_over_floor"],
            "dequant_bytes_floor_s": deq_floor_s, "dequantize_s": deq_s, "cublas_s": cublas_s,
            "dequant_s": total, "dequant_over_floor": round(total / (flops_s + deq_floor_s), 3)}


def train_profile(selected: list[TrainCase], jobs: int = 1, candidates: bool = True) -> list[dict]:
    """One row per case: the chosen strategy's estimate over its floor, with the
    fused kernel's (the config the launcher runs; the best autotune candidate
    beside it, unless ``candidates`` is False) and the dequant strategy's."""
    import triton

    sc._require_compiled_mode()
    plans, todo = [], {}
    for case in selected:
        shipped, kept = fused_configs(case)
        vs = [(cfg, fused_variant(case, cfg)) for cfg in [shipped, *(kept if candidates else [])]]
        dv = dequantize_variant(case)
        plans.append((case, vs, dv))
        for _, v in vs:
            todo.setdefault(v.label, ("loop", v))
        todo.setdefault(dv.label, ("whole", dv))
    labels = list(todo)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            profs = dict(zip(labels, pool.map(_train_worker, [todo[k] for k in labels])))
    else:
        profs = {k: _train_worker(todo[k]) for k in labels}
    rows = []
    for case, vs, dv in plans:
        strategy = chosen_strategy(case)
        family, kernel = fused_kernel(case)
        head = {"kernel": family, "op": case.op, "triton": triton.__version__, "N": case.N,
                "K": case.K, "M": case.M, "dtype": case.dtype,
                "path": "aligned" if case.K % case.blocksize == 0 else "general",
                "blocksize": case.blocksize, "double_quant": case.double_quant,
                "kernel_fn": kernel, "strategy": strategy}
        (_, v_run), rest = vs[0], vs[1:]
        if "error" in profs[v_run.label] or "error" in profs[dv.label]:
            rows.append({**head, "error": (profs[v_run.label].get("error")
                                           or profs[dv.label]["error"])})
            continue
        run = fused_estimate(case, vs[0][0], profs[v_run.label])
        kept = [fused_estimate(case, cfg, profs[v.label]) for cfg, v in rest
                if "error" not in profs[v.label]]
        best = min(kept, key=lambda r: r["fused_s"]) if kept else run
        deq = dequantize_estimate(case, profs[dv.label])
        flops_s = 2 * case.M * case.N * case.K / TENSOR_FLOPS
        floor_s = flops_s + (deq["dequant_bytes_floor_s"] if strategy == "dequant" else 0.0)
        chosen_s = deq["dequant_s"] if strategy == "dequant" else run["fused_s"]
        rows.append({**head, **run, **deq, "flops": 2 * case.M * case.N * case.K,
                     "floor_s": floor_s, "estimate_s": chosen_s,
                     "bound_over_floor": round(chosen_s / floor_s, 3),
                     "best_kept_config": best["config"],
                     "best_kept_fused_over_floor": best["fused_over_floor"],
                     "kept_configs": len(kept),
                     "kept": [{k: r[k] for k in ("config", "thread_instr_per_weight",
                                                 "fused_over_floor", "registers", "overlap")}
                              for r in kept]})
    return rows


# --------------------------------------------------------------------------- report
_NOTE = ("compile-time estimates (static SASS counts, sm_90 ahead of time, no GPU): "
         "not GPU measurements")


def environment(commands: list[str]) -> dict:
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "qlora_triton"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__, "git_commit": commit + ("+dirty" if dirty else ""),
            "target": f"cuda sm_{sc.ARCH} (warp 32)", "nvdisasm": find_tool("nvdisasm"),
            "machine": f"{os.cpu_count()} CPU cores, no GPU", "note": _NOTE, "commands": commands,
            "model": {"sms": SMS, "schedulers": SCHEDULERS, "clock_hz": CLOCK_HZ,
                      "hbm_bytes_per_s": HBM_BYTES_PER_S,
                      "smem_bytes_per_clock_per_sm": SMEM_BYTES_PER_CLOCK,
                      "lsu_instr_per_clock_per_sm": 1,
                      "l1_clocks_per_line_per_sm": L1_CLOCKS_PER_LINE, "line_bytes": LINE_BYTES}}


_COLUMNS = [("kernel", "kernel"), ("triton", "triton"), ("N", "N"), ("K", "K"), ("M", "M"),
            ("dtype", "dtype"), ("path", "path"), ("config", "config"),
            ("thread_instr_per_weight", "instr/wt"), ("registers", "regs"),
            ("programs", "programs"), ("programs_per_sm", "prog/SM"), ("waves", "waves"),
            ("warps_per_scheduler", "warps/sched"), ("bytes_in_flight_per_sm", "B in flight/SM"),
            ("issue_over_floor", "issue"), ("issue_per_scheduler_over_floor", "issue/sched"),
            ("latency_over_floor", "latency"), ("lsu_over_floor", "LSU"),
            ("smem_over_floor", "smem"), ("l1_lines_per_weight", "L1 lines/wt"),
            ("l1_over_floor", "L1"), ("bound_over_floor", "bound"), ("binding", "binds"),
            ("estimate_us", "est. us")]


def markdown(report: dict) -> str:
    out = [f"# sm_90 SASS profile of the decode matmul ({report['title']})", "",
           f"**{_NOTE[0].upper() + _NOTE[1:]}.** Method: `scripts/sm90_sass.py` (module docstring). "
           "Each bound is the busiest SM's time under it over the HBM floor (packed + scale bytes "
           "at 4.3 TB/s; the dequantize also writes x's dtype): issue over all 4 schedulers, "
           "issue per scheduler (the resident warps dealt to 4 schedulers), memory latency "
           "(Little's law, 700 ns, bytes in flight per SM = resident programs x the loop's "
           "loads x pipeline depth), LSU, shared memory, L1/TEX (the distinct 128-byte lines "
           "of each global load, from the kernel's described load pattern, plus the "
           "shared-memory wavefronts, at 1.8 SM clocks per line, fitted on the H200's ncu "
           "cycles); `bound` is the largest and `binds` names it (`bound_model`); `est. us`: "
           "the binding bound's time (at least the floor; split partial sums not counted).", ""]
    for env in report["environments"]:
        out.append(f"- Triton {env['triton']}, commit {env['git_commit']}, {env['date']}, "
                   f"{env['machine']}: `" + "`; `".join(env["commands"]) + "`")
    out += ["", "| " + " | ".join(h for _, h in _COLUMNS) + " |",
            "|" + "---|" * len(_COLUMNS)]
    for r in report["rows"]:
        out.append("| " + " | ".join(str(r.get(k, r.get("error", "")[:40] if k == "config" else ""))
                                     for k, _ in _COLUMNS) + " |")
    out += ["", "Loop instruction classes (warp-instructions per trip) of each distinct compile:", ""]
    seen = set()
    for r in report["rows"]:
        key = (r["triton"], r["config"], r["dtype"], r["path"])
        if key in seen or "classes" not in r:
            continue
        seen.add(key)
        classes = ", ".join(f"{k} {v}" for k, v in sorted(r["classes"].items(), key=lambda kv: -kv[1]))
        widths = ", ".join(f"{k} {v}" for k, v in sorted(r["widths"].items()))
        out.append(f"- Triton {r['triton']} {r['kernel']} {r['config']} {r['dtype']} {r['path']}: "
                   f"{r['loop_instructions']} per trip of {r['weights_per_trip']} weights x "
                   f"{r['num_warps']} warps; {classes}; widths: {widths}")
    return "\n".join(out) + "\n"


_TRAIN_COLUMNS = [("triton", "triton"), ("op", "op"), ("N", "N"), ("K", "K"), ("M", "M"),
                  ("strategy", "strategy"), ("bound_over_floor", "bound"),
                  ("floor_s", "floor us"), ("estimate_s", "est. us"),
                  ("fused_over_floor", "fused/flops"), ("fused_tensor_fraction", "fused peak"),
                  ("dequant_over_floor", "dequant/floor"), ("config", "fused config"),
                  ("thread_instr_per_weight", "instr/wt"), ("overlap", "overlap"),
                  ("programs_per_sm", "prog/SM"), ("registers", "regs"),
                  ("dequant_kernel_bound_over_floor", "deq. kernel bound")]


def _cell(row: dict, key: str) -> str:
    v = row.get(key, "")
    if key in ("floor_s", "estimate_s") and v != "":
        return f"{v * 1e6:.1f}"
    return str(v)


def markdown_train(report: dict) -> str:
    out = [f"# sm_90 SASS profile at training shapes ({report['title']})", "",
           f"**{_NOTE[0].upper() + _NOTE[1:]}.** Method: `scripts/sm90_sass.py --train` (module "
           "docstring, \"Training mode\"). `strategy`: what `select_strategy` picks on sm_90; "
           "`bound`: its estimate over its floor (flops at 790 TFLOP/s, plus the dequantize's "
           "bytes at 4.3 TB/s for `dequant`); `fused/flops`: the fused kernel's estimate over "
           "the flops alone, `fused peak` its fraction of the tensor peak; `dequant/floor`: "
           "dequantize + cuBLAS over flops + dequantize bytes.", ""]
    for env in report["environments"]:
        out.append(f"- Triton {env['triton']}, commit {env['git_commit']}, {env['date']}, "
                   f"{env['machine']}: `" + "`; `".join(env["commands"]) + "`")
    out += ["", "| " + " | ".join(h for _, h in _TRAIN_COLUMNS) + " |",
            "|" + "---|" * len(_TRAIN_COLUMNS)]
    for r in report["rows"]:
        if "error" in r:
            out.append(f"| {r['triton']} | {r['op']} | {r['N']} | {r['K']} | {r['M']} | "
                       f"{r['strategy']} | ERROR {r['error'][:80]} |")
            continue
        out.append("| " + " | ".join(_cell(r, k) for k, _ in _TRAIN_COLUMNS) + " |")
    out += ["", "Fused loop per trip (warp-instructions; us of one SM per trip: mma, decode, "
            "trip) of each distinct compile:", ""]
    seen = set()
    for r in report["rows"]:
        key = (r["triton"], r["op"], r.get("config"))
        if key in seen or "classes" not in r:
            continue
        seen.add(key)
        classes = ", ".join(f"{k} {v}" for k, v in sorted(r["classes"].items(), key=lambda kv: -kv[1]))
        t = r["trip_us"]
        out.append(f"- Triton {r['triton']} {r['kernel']} {r['config']}: {r['loop_instructions']} "
                   f"per trip of {r['weights_per_trip']} weights x {r['num_warps']} warps, "
                   f"wgmma wait {r['wgmma_wait']}, {r['programs_per_sm']} program(s)/SM, "
                   f"mma {t['mma']} decode {t['decode']} trip {t['trip']} us; {classes}")
    return "\n".join(out) + "\n"


def write_report(folder: Path, title: str) -> None:
    """report.json / report.md from every triton-*.json in ``folder``."""
    parts = [json.loads(p.read_text()) for p in sorted(folder.glob("triton-*.json"))]
    report = {"title": title, "note": _NOTE, "environments": [p["environment"] for p in parts],
              "rows": [r for p in parts for r in p["rows"]]}
    train = any("strategy" in r for r in report["rows"])
    _atomic_write(folder / "report.json", json.dumps(report, indent=1) + "\n")
    _atomic_write(folder / "report.md", markdown_train(report) if train else markdown(report))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="report folder (writes triton-<version>.json, "
                   "then report.json / report.md from every triton-*.json there)")
    p.add_argument("--title", default="after", help="the report's name, e.g. 'before, d545751'")
    p.add_argument("--subset", action="store_true", help="one case (the CI set); with --train "
                   "only the launcher's config, no autotune candidates")
    p.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    p.add_argument("--dtypes", default="bf16", help="comma-separated x dtypes of the decode rows")
    p.add_argument("--train", action="store_true", help="training shapes: the fused GEMM / "
                   "grad-input against dequantize + cuBLAS, and the strategy the table picks")
    args = p.parse_args(argv)
    import triton

    if args.train:
        return _train_main(args, argv)
    rows = profile(cases(args.subset, tuple(args.dtypes.split(","))), args.jobs)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/sm90_sass.py " + " ".join(argv if argv is not None else sys.argv[1:])
    _atomic_write(folder / f"triton-{triton.__version__}.json",
                  json.dumps({"environment": environment([cmd]), "rows": rows}, indent=1) + "\n")
    write_report(folder, args.title)
    for r in rows:
        print(f"{r['kernel']} {r['N']}x{r['K']} M={r['M']} {r['dtype']} {r['path']} {r['config']}: "
              f"{r.get('thread_instr_per_weight')} instr/wt, bound {r.get('bound_over_floor')} "
              f"({r.get('binding')})" + (f" ERROR {r['error'][:200]}" if "error" in r else ""))
    return 0 if all("error" not in r for r in rows) else 1


def _train_main(args, argv) -> int:
    import triton

    rows = train_profile(train_cases(args.subset), args.jobs, candidates=not args.subset)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/sm90_sass.py " + " ".join(argv if argv is not None else sys.argv[1:])
    _atomic_write(folder / f"triton-{triton.__version__}.json",
                  json.dumps({"environment": environment([cmd]), "rows": rows}, indent=1) + "\n")
    write_report(folder, args.title)
    for r in rows:
        print(f"{r['op']} {r['N']}x{r['K']} M={r['M']} {r['strategy']}: bound {r.get('bound_over_floor')}"
              f" fused {r.get('fused_over_floor')} ({r.get('config')}, "
              f"{r.get('thread_instr_per_weight')} instr/wt) dequant {r.get('dequant_over_floor')}"
              + (f" ERROR {r['error'][:200]}" if "error" in r else ""))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
