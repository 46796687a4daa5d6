"""Where a small-M matmul's time goes on the GPU: host launch cost against
kernel time, and the GEMV tile/split sweep that calibrates ops/tuned_sm90.py.

The first GPU check (benchmarks/results/h200-2026-12-04) timed qlora_triton's
M = 1 and M = 16 forward at 10-100x its floor with do_bench, which times
back-to-back calls: when the host takes longer to launch a call than the GPU
takes to run it, that is the host's time. This script separates the two:

* ``host_us``: the time to enqueue one call (no synchronization; the queue
  never fills at these sizes), ``wall_us``: enqueue plus run, synchronized,
  ``graph_us``: the same call captured in a CUDA graph and replayed (GPU time
  alone, no Python), per provider;
* a cProfile of the host path of one M = 1 call;
* the GEMV configs (tile, split) of :mod:`qlora_triton.ops.tuned_sm90`, each
  timed by graph replay, beside the shipped choice;
* what ``torch.cuda.mem_get_info`` counts of paged (managed) optimizer states;
* ``--parts kernels``: one call of each GEMV, for ``ncu`` to profile;
* ``lora``: the LoRA layer's forward + backward at training size (M = 2048),
  every provider: host time per call against GPU-busy time (the kernels' and
  copies' durations from ``torch.profiler``; a backward is not captured in a
  graph here), and the kernels per call;
* ``step``: one training step of a two-layer model with 7B's widths, QLoRA
  (fused blocks + Liger, as the preset runs) and 16-bit LoRA (PEFT on bf16):
  wall time against GPU-busy time, kernels per step. When wall far exceeds
  busy, the step waits on the host (the 7B preset's question).

Writes JSON lines to ``--out`` as it goes; a run cut short keeps what it had::

    python -m benchmarks.gpu_diag --out diag.jsonl      # GPU only
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import statistics
import time

import torch

import qlora_triton as qt
from qlora_triton.ops import gemv as gemv_mod
from qlora_triton.ops import tuned_sm90

SHAPES = ((4096, 4096), (8192, 8192), (28672, 8192))
CUDA = torch.device("cuda")
MS = (1, 16)


def graph_us(fn, reps: int = 200) -> float:
    """Median-free mean GPU time of ``fn`` per call, by CUDA-graph replay of 10 calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps // 10):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def host_wall_us(fn, reps: int = 200) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e6 / reps, (t2 - t0) * 1e6 / reps


def gpu_busy(fn, reps: int = 10) -> tuple[float, float]:
    """(GPU-busy microseconds per call, kernels per call): the summed durations
    of the CUDA kernels, copies and fills ``torch.profiler`` records over
    ``reps`` calls (one stream, so they never overlap)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in device) / reps, len(device) / reps


def emit(out, row: dict) -> None:
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    out.flush()


def providers(N: int, K: int, M: int):
    w = torch.randn(N, K, device="cuda") * 0.02
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    qw = qt.quantize_nf4(w, double_quant=True)
    fns = {"qlora_triton": lambda: qt.nf4_matmul(x, qw)}
    wb = w.to(torch.bfloat16)
    fns["bf16"] = lambda: torch.nn.functional.linear(x, wb)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(wb, blocksize=64, compress_statistics=True, quant_type="nf4")
        fns["bitsandbytes"] = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
    except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
        print("bitsandbytes:", e)
    return qw, x, fns


def split_rows(out) -> None:
    for N, K in SHAPES:
        for M in MS:
            _, _, fns = providers(N, K, M)
            for name, fn in fns.items():
                row = {"part": "host_vs_gpu", "N": N, "K": K, "M": M, "provider": name}
                try:
                    row["host_us"], row["wall_us"] = host_wall_us(fn)
                    row["graph_us"] = graph_us(fn)
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
                emit(out, row)
            del fns
            torch.cuda.empty_cache()


def profile_host(out) -> None:
    _, _, fns = providers(4096, 4096, 1)
    fn = fns["qlora_triton"]
    for _ in range(10):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    emit(out, {"part": "cprofile_m1", "text": s.getvalue()[-6000:]})


def sweep(out) -> None:
    shipped = tuned_sm90.gemv_config
    for M, kernel in ((1, "fma"), (16, "dot")):
        tiles = tuned_sm90._TILES[kernel]
        splits = (1, 2, 4, 8, 16, 32) if kernel == "fma" else (1, 2, 4, 8, 16)
        for N, K in SHAPES:
            qw, x, _ = providers(N, K, M)
            base = shipped(kernel, N, K, 64, False)
            emit(out, {"part": "shipped", "kernel": kernel, "N": N, "K": K, "M": M,
                       "config": dict(base.kwargs, warps=base.num_warps, stages=base.num_stages)})
            for block_n, warps, stages, *_ in tiles:
                for split in splits:
                    cfg = tuned_sm90._config(block_n, tuned_sm90._block_k(kernel, 64), split, warps,
                                             stages)
                    gemv_mod.gemv_config = lambda *a, cfg=cfg, **k: cfg
                    row = {"part": "sweep", "kernel": kernel, "N": N, "K": K, "M": M, "BLOCK_N": block_n,
                           "SPLIT_K": split, "warps": warps, "stages": stages}
                    try:
                        row["graph_us"] = graph_us(lambda: qt.nf4_matmul(x, qw), reps=100)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = repr(e)[:300]
                    finally:
                        gemv_mod.gemv_config = shipped
                    emit(out, row)
            torch.cuda.empty_cache()


def free() -> int:
    """Free device memory as the driver reports it, after the queued work."""
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def paged(out) -> None:
    from qlora_triton import paged as paged_mod

    n = 256 << 20
    row = {"part": "paged", "free_start": free()}
    p = torch.randn(n, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    row["free_param"] = free()
    opt = qt.PagedAdamW([p])
    opt.step()
    row["free_after_step"] = free()
    states = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.numel() > 1]
    row["state_bytes"] = sum(t.nbytes for t in states)

    def read_ms() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in states:
            t.sum()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    row["read_ms_resident"] = read_ms()
    opt.evict()
    row["free_after_evict"] = free()
    row["read_ms_after_evict"] = read_ms()  # faults the pages back
    row["free_after_fault_back"] = free()
    opt.evict()
    free()
    opt.prefetch()
    row["free_after_prefetch"] = free()
    row["read_ms_after_prefetch"] = read_ms()
    row["helper"] = str(paged_mod.HELPER_PATH)
    emit(out, row)


def managed_accounting(out) -> None:
    """What ``mem_get_info`` counts of a managed allocation: at allocation, on
    first touch, after eviction, after prefetch (512 MiB, far under free memory)."""
    from qlora_triton import paged as paged_mod

    row = {"part": "managed_accounting", "free_start": free(), "reserved_start": torch.cuda.memory_reserved()}
    t = paged_mod.managed_empty((128 << 20,), torch.float32, "cuda")
    row["free_after_alloc"] = free()
    t.fill_(1.0)
    row["free_after_touch"] = free()
    paged_mod.evict_to_host([t])
    row["free_after_evict"] = free()
    row["location_after_evict"] = paged_mod.last_prefetch_location(t)
    paged_mod.prefetch_to_device([t])
    row["free_after_prefetch"] = free()
    row["location_after_prefetch"] = paged_mod.last_prefetch_location(t)
    row["reserved_end"] = torch.cuda.memory_reserved()
    del t
    emit(out, row)


def lora_rows(out) -> None:
    from benchmarks import providers as prov
    from benchmarks.cases import Case

    for shape in SHAPES[:2]:
        case = Case(op="lora_fwd_bwd", shape=shape, m=2048)
        for name in ("qlora_triton", "bitsandbytes", "bf16"):
            row = {"part": "lora_host_vs_gpu", "N": shape[0], "K": shape[1], "M": case.m, "provider": name}
            try:
                fn = prov.build(name, case, CUDA)
                row["host_us"], row["wall_us"] = host_wall_us(fn, reps=50)
                row["busy_us"], row["kernels"] = gpu_busy(fn)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:300]
            emit(out, row)
            fn = None
            torch.cuda.empty_cache()


def step_rows(out) -> None:
    from qlora_triton.finetune import presets, speedups
    from qlora_triton.finetune.step import timed_step

    shape = dataclasses.replace(presets.LLAMA_SHAPES["7b"], num_hidden_layers=2)
    batch = torch.randint(0, shape.vocab_size, (1, 512), device=CUDA)
    for method in ("qlora", "lora16"):
        row = {"part": "step_wall_vs_gpu", "preset": "7b", "layers": shape.num_hidden_layers,
               "tokens": batch.numel(), "method": method}
        try:  # set up as the preset run sets up each side (presets.prepare_qlora / prepare_lora16)
            if method == "qlora":
                model = presets.build_quantized_llama(shape, CUDA, 8, 16.0)
                ran, _, optimizer = presets.prepare_qlora(model, speedups.resolve(), CUDA, 2e-4)
                row["speedups"] = [k for k, v in ran.items() if v]
            else:
                model = presets.build_lora16_llama(shape, CUDA, 8, 16.0)
                liger, _, optimizer = presets.prepare_lora16(model, True, CUDA, 2e-4)
                row["speedups"] = [liger]
            walls = [timed_step(model, batch, optimizer, CUDA)[1] * 1e6 for _ in range(4)][1:]
            row["wall_us"] = statistics.median(walls)
            row["busy_us"], row["kernels"] = gpu_busy(lambda: timed_step(model, batch, optimizer, CUDA), reps=3)
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:300]
        emit(out, row)
        model = optimizer = None
        torch.cuda.empty_cache()


def kernels(out) -> None:
    """Each GEMV once more after a warm-up call, for ``ncu -k regex:...`` to profile:
    the FMA kernel (M = 1) and the tensor-core one (M = 16) on 28672x8192 with the
    shipped configs, and bitsandbytes' M = 1 kernel beside them."""
    for M in (1, 16):
        _, _, fns = providers(28672, 8192, M)
        for name in ("qlora_triton", "bitsandbytes"):
            if name in fns:
                fns[name]()
                fns[name]()
        torch.cuda.synchronize()
    emit(out, {"part": "kernels", "done": True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="paged,managed,split,profile,sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_diag needs a CUDA device")
    parts = {"paged": paged, "managed": managed_accounting, "split": split_rows, "profile": profile_host,
             "sweep": sweep, "kernels": kernels, "lora": lora_rows, "step": step_rows}
    with open(args.out, "a") as out:
        for name in args.parts.split(","):
            t0 = time.perf_counter()
            try:
                parts[name](out)
            except Exception as e:  # noqa: BLE001
                emit(out, {"part": name, "error": repr(e)[:500]})
            print(f"== {name} {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
