"""What the suite measures: the cases, their sizes, and the floor of each.

A case is one op at one size. Its floor is the time no implementation can beat
on the machine at hand: the fewest bytes the op must move (each input read once,
each output written once, the weight in its packed NF4 form) over the measured
device copy bandwidth, or its flops over the measured bf16 matmul rate,
whichever is larger (the larger term says whether the op is memory- or
compute-bound).
"""

from __future__ import annotations

import dataclasses
import math

# The ops, in the order the suite runs and reports them.
OPS = ("quantize", "dequantize", "matmul_fwd", "matmul_grad_input", "lora_fwd_bwd", "optimizer_step")

# LLaMA layer shapes as (N, K) = (out_features, in_features): attention
# projections and the MLP up/down projections of the 7B and 70B models.
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192))
M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096)  # rows of x: decode .. training
LORA_M = (512, 2048, 8192)
LORA_R = 16
LORA_ALPHA = 32
OPTIMIZER_PARAMS = 1_000_000_000
OPTIMIZER_TENSORS = 16  # the state is split over several tensors, as in a model
OPTIMIZER_VARIANTS = ("32bit", "8bit")
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

# --smoke: every case once, at sizes the CPU (and Triton's interpreter) runs in seconds.
# torchao's NF4Tensor needs the number of blocks to be a multiple of 256.
SMOKE_SHAPES = ((128, 128),)
SMOKE_M_SWEEP = (1, 16)
SMOKE_LORA_M = (8,)
SMOKE_OPTIMIZER_PARAMS = 16384  # 8-bit state needs >= 4096 per tensor in bitsandbytes
SMOKE_OPTIMIZER_TENSORS = 2

BF16_BYTES = 2
FP32_BYTES = 4


def nf4_bytes(n: int, k: int) -> int:
    """Bytes of an [n, k] NF4 weight with double-quantized scales: the packed
    codes, one uint8 scale per block, one fp32 second-level scale per 256 blocks."""
    numel = n * k
    blocks = math.ceil(numel / BLOCKSIZE)
    return (numel + 1) // 2 + blocks + FP32_BYTES * math.ceil(blocks / NESTED_BLOCKSIZE)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one size.

    ``shape`` is the weight's (N, K) for the weight ops; ``m`` the rows of the
    activation for the matmul and LoRA ops; ``params`` and ``variant`` ("32bit"
    or "8bit" state) for the optimizer step."""

    op: str
    shape: tuple[int, int] | None = None
    m: int | None = None
    params: int | None = None
    tensors: int | None = None
    variant: str = ""

    @property
    def shape_str(self) -> str:
        if self.shape is not None:
            return f"{self.shape[0]}x{self.shape[1]}"
        return f"{self.params:,} params"

    @property
    def id(self) -> str:
        """A short unique name, used for pytest ids and progress bars."""
        parts = [self.op, self.variant, self.shape_str.replace(",", "").replace(" ", "-")]
        if self.m is not None:
            parts.append(f"M{self.m}")
        return "-".join(p for p in parts if p)

    # -- the floor ------------------------------------------------------------------
    def bytes_moved(self) -> int:
        """Fewest bytes the op must read and write in device memory."""
        if self.op == "optimizer_step":
            p = self.params
            if self.variant == "8bit":
                # read param, grad (fp32) and two 8-bit states with their fp32
                # absmax per 256; write param and both states.
                states = 2 * (p + FP32_BYTES * math.ceil(p / 256))
                return 3 * FP32_BYTES * p + 2 * states
            # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq.
            return 7 * FP32_BYTES * p
        n, k = self.shape
        w4 = nf4_bytes(n, k)
        if self.op in ("quantize", "dequantize"):
            return BF16_BYTES * n * k + w4
        m = self.m
        if self.op == "matmul_fwd":  # read x [m, k] and W; write y [m, n]
            return BF16_BYTES * (m * k + m * n) + w4
        if self.op == "matmul_grad_input":  # read grad_y [m, n] and W; write grad_x [m, k]
            return BF16_BYTES * (m * n + m * k) + w4
        if self.op == "lora_fwd_bwd":
            # x, y, grad_y, grad_x once each; W once; the fp32 adapters (read)
            # and their grads (written) are small but counted.
            adapters = 2 * FP32_BYTES * LORA_R * (n + k)
            return BF16_BYTES * 2 * (m * k + m * n) + w4 + adapters
        raise ValueError(f"unknown op {self.op!r}")

    def flops(self) -> int:
        """Multiply-adds times two of the matrix products; 0 for elementwise ops."""
        if self.op in ("quantize", "dequantize", "optimizer_step"):
            return 0
        n, k = self.shape
        m = self.m
        if self.op in ("matmul_fwd", "matmul_grad_input"):
            return 2 * m * n * k
        # base forward and input gradient (the weight is frozen), plus the
        # adapter: x@A, (xA)@B forward, and three products of the same sizes
        # backward (grad B, grad xA, grad A) plus grad x through A.
        return 4 * m * n * k + 6 * m * LORA_R * (n + k)

    def floor_ms(self, copy_gbps: float, matmul_tflops: float) -> tuple[float, str]:
        """(floor in ms, "memory" or "compute") from the measured ceilings."""
        mem_ms = self.bytes_moved() / (copy_gbps * 1e9) * 1e3
        compute_ms = self.flops() / (matmul_tflops * 1e12) * 1e3
        return (mem_ms, "memory") if mem_ms >= compute_ms else (compute_ms, "compute")


def all_cases(smoke: bool = False, ops: tuple[str, ...] = OPS, shapes: tuple[tuple[int, int], ...] | None = None,
              ms: tuple[int, ...] | None = None) -> list[Case]:
    """Every case of the suite, grouped by op then shape (so that a weight is
    quantized once per shape and reused over the M sweep). ``shapes`` and ``ms``
    keep a subset of the run's shapes and of its M values (the matmul and LoRA
    sweeps; ops without activations are not filtered by M)."""
    all_shapes = SMOKE_SHAPES if smoke else SHAPES
    sweep = SMOKE_M_SWEEP if smoke else M_SWEEP
    lora_m = SMOKE_LORA_M if smoke else LORA_M
    params = SMOKE_OPTIMIZER_PARAMS if smoke else OPTIMIZER_PARAMS
    tensors = SMOKE_OPTIMIZER_TENSORS if smoke else OPTIMIZER_TENSORS
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"ops must be among {OPS}, got {sorted(unknown)}")
    if shapes is not None:
        bad = [s for s in shapes if s not in all_shapes]
        if bad:
            raise ValueError(f"shapes must be among {', '.join(f'{n}x{k}' for n, k in all_shapes)} for this run, "
                             f"got {', '.join(f'{n}x{k}' for n, k in bad)}")
        all_shapes = tuple(s for s in all_shapes if s in shapes)
    if ms is not None:
        bad = [m for m in ms if m not in sweep + lora_m]
        if bad:
            raise ValueError(f"M values must be among {', '.join(map(str, sorted(set(sweep + lora_m))))} "
                             f"for this run, got {', '.join(map(str, bad))}")
        sweep, lora_m = tuple(m for m in sweep if m in ms), tuple(m for m in lora_m if m in ms)
    cases: list[Case] = []
    for op in OPS:
        if op not in ops:
            continue
        if op in ("quantize", "dequantize"):
            cases += [Case(op, shape=s) for s in all_shapes]
        elif op in ("matmul_fwd", "matmul_grad_input"):
            cases += [Case(op, shape=s, m=m) for s in all_shapes for m in sweep]
        elif op == "lora_fwd_bwd":
            cases += [Case(op, shape=s, m=m) for s in all_shapes for m in lora_m]
        else:
            cases += [Case(op, params=params, tensors=tensors, variant=v) for v in OPTIMIZER_VARIANTS]
    return cases
