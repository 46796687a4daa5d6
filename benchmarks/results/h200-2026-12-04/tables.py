"""The tables of this folder's README, printed from its JSON files (so that each
number traces to a file): ``python benchmarks/results/h200-2026-12-04/tables.py``.

run1/: the GPU check at commit b8c5966; run2/: benchmarks/gpu_diag.py at 8b2149d
(host vs GPU time, the GEMV tile/split sweep, the paged states); run3/: the GPU
check and gpu_diag at 91a875d (the GEMV configs recalibrated from run2's sweep).
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
STATIC = HERE.parent / "sm90-decode-2026-12-04" / "triton-3.6.0.json"
SHAPES = ((4096, 4096), (8192, 8192), (28672, 8192))


def jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bench_rows(run: str) -> dict:
    data = json.loads((HERE / run / "results.json").read_text())
    return {(r["case"], r["provider"]): r for r in data["results"]}


def fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def core_table() -> None:
    rows = bench_rows("run3")
    print("| op | shape | M | qlora_triton ms | bitsandbytes ms | bf16 ms | floor ms | qt/floor | bnb/qt | bf16/qt |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (case, provider), r in rows.items():
        if provider != "qlora_triton":
            continue
        bnb, bf16 = rows.get((case, "bitsandbytes"), {}), rows.get((case, "bf16"), {})
        qt_ms = r["ms"]
        ratio = lambda o: fmt(o["ms"] / qt_ms, 2) if o.get("ms") else "n/a"  # noqa: E731
        label = r["variant"] or (r["m"] if r["m"] is not None else "-")
        print(f"| {r['op']} | {r['shape']} | {label} | {fmt(qt_ms, 4)} | {fmt(bnb.get('ms'), 4)} | "
              f"{fmt(bf16.get('ms'), 4)} | {fmt(r['floor_ms'], 4)} | {fmt(r['x_floor'], 2)} | {ratio(bnb)} | "
              f"{ratio(bf16)} |")


def gpu_time_table() -> None:
    rows = {(r["N"], r["K"], r["M"], r["provider"]): r for r in jsonl(HERE / "run3" / "diag.jsonl")
            if r["part"] == "host_vs_gpu"}
    before = {(r["N"], r["K"], r["M"], r["provider"]): r for r in jsonl(HERE / "run2" / "diag.jsonl")
              if r["part"] == "host_vs_gpu"}
    floors = {(r["n"], r["k"]): r["floor_ms"] * 1e3 for r in bench_rows("run3").values()
              if r["op"] == "matmul_fwd" and r["m"] == 1}
    print("| shape | M | floor us | qt GPU us (before) | qt GPU us | bnb GPU us | bf16 GPU us | qt/floor | bnb/qt "
          "| bf16/qt | qt host us | bnb host us | bf16 host us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for N, K in SHAPES:
        for M in (1, 16):
            qt, bnb, bf = (rows[(N, K, M, p)] for p in ("qlora_triton", "bitsandbytes", "bf16"))
            old = before[(N, K, M, "qlora_triton")]["graph_us"]
            floor = floors[(N, K)]
            print(f"| {N}x{K} | {M} | {floor:.1f} | {old:.1f} | {qt['graph_us']:.1f} | {bnb['graph_us']:.1f} | "
                  f"{bf['graph_us']:.1f} | {qt['graph_us'] / floor:.2f} | {bnb['graph_us'] / qt['graph_us']:.2f} | "
                  f"{bf['graph_us'] / qt['graph_us']:.2f} | {qt['host_us']:.0f} | {bnb['host_us']:.0f} | "
                  f"{bf['host_us']:.0f} |")


def calibration_table() -> None:
    """The static profile's estimate for a (kernel, shape, config) beside the
    sweep's graph-replayed time of that very config."""
    static = json.loads(STATIC.read_text())["rows"]
    sweep = jsonl(HERE / "run2" / "diag.jsonl")
    print("| kernel | shape | M | config | static bound (binds) | est. us | measured us | measured/est. |")
    print("|---|---|---|---|---|---|---|---|")
    for s in static:
        if s["kernel"] not in ("gemv_fma", "gemv_dot") or s["M"] not in (1, 16) or (s["N"], s["K"]) not in SHAPES:
            continue
        block_n = int(s["config"].split("x")[0])
        split = int(s["config"].split("SPLIT_K=")[1])
        kernel = "fma" if s["kernel"] == "gemv_fma" else "dot"
        hit = [r for r in sweep if r["part"] == "sweep" and r["kernel"] == kernel and r["N"] == s["N"]
               and r["K"] == s["K"] and r["BLOCK_N"] == block_n and r["SPLIT_K"] == split]
        if not hit:
            continue
        est = s["bound_over_floor"] * s["floor_us"]
        meas = hit[0]["graph_us"]
        print(f"| {s['kernel']} | {s['N']}x{s['K']} | {s['M']} | {s['config']} | {s['bound_over_floor']:.3f} "
              f"({s['binding']}) | {est:.1f} | {meas:.1f} | {meas / est:.2f} |")


def sweep_table() -> None:
    sweep = [r for r in jsonl(HERE / "run2" / "diag.jsonl") if r["part"] == "sweep"]
    shipped = {(r["kernel"], r["N"], r["K"]): r["config"] for r in jsonl(HERE / "run2" / "diag.jsonl")
               if r["part"] == "shipped"}
    print("| kernel | shape | best (BLOCK_N/SPLIT_K) | best us | shipped before (BLOCK_N/SPLIT_K) | its us |")
    print("|---|---|---|---|---|---|")
    for kernel in ("fma", "dot"):
        for N, K in SHAPES:
            rows = [r for r in sweep if r["kernel"] == kernel and r["N"] == N and r["K"] == K and "graph_us" in r]
            best = min(rows, key=lambda r: r["graph_us"])
            cfg = shipped[(kernel, N, K)]
            old = [r for r in rows if r["BLOCK_N"] == cfg["BLOCK_N"] and r["SPLIT_K"] == cfg["SPLIT_K"]]
            old_us = f"{old[0]['graph_us']:.1f}" if old else "n/a"
            print(f"| {kernel} | {N}x{K} | {best['BLOCK_N']}/{best['SPLIT_K']} | {best['graph_us']:.1f} | "
                  f"{cfg['BLOCK_N']}/{cfg['SPLIT_K']} | {old_us} |")


def other_rows() -> None:
    preset = json.loads((HERE / "run3" / "preset-7b.json").read_text())
    print(f"- 7B preset ({preset['device_name']}, batch {preset['batch_size']} x {preset['seq_len']}, "
          f"speedups {preset['speedups']}): median step {preset['step_seconds_median'] * 1e3:.1f} ms, "
          f"{preset['tokens_per_s']:.0f} tokens/s, peak {preset['memory']['peak_bytes'] / 2**30:.2f} GiB "
          f"(estimate {preset['estimate_bytes']['total'] / 2**30:.2f} GiB)")
    for run in ("run1", "run3"):
        for r in jsonl(HERE / run / "decode.jsonl"):
            if r["status"] == "ok":
                print(f"- decode {run} {r['provider']} {r['mode']}: {r['ms_per_token']:.2f} ms/token "
                      f"({r['layers']} layers of {r['preset']})")
            else:
                print(f"- decode {run} {r['provider']} {r['mode']}: {r['status'].splitlines()[0][:120]}")
    paged = [r for r in jsonl(HERE / "run2" / "diag.jsonl") if r["part"] == "paged"][0]
    managed = [r for r in jsonl(HERE / "run3" / "diag.jsonl") if r["part"] == "managed_accounting"][0]
    print(f"- paged states (2 GiB): read after evict {paged['read_ms_after_evict']:.1f} ms, after prefetch "
          f"{paged['read_ms_after_prefetch']:.2f} ms; mem_get_info free unchanged by evict/prefetch: "
          f"{paged['free_after_step'] == paged['free_after_evict'] == paged['free_after_prefetch']}")
    print(f"- managed 512 MiB: free -{(managed['free_start'] - managed['free_after_alloc']) / 2**20:.0f} MiB at "
          f"allocation, -{(managed['free_start'] - managed['free_after_touch']) / 2**20:.0f} MiB after first touch "
          f"on the GPU, then unchanged by evict ({managed['location_after_evict']}) and prefetch "
          f"({managed['location_after_prefetch']})")


if __name__ == "__main__":
    for title, fn in (("core table (run3, do_bench median)", core_table),
                      ("GPU time by CUDA-graph replay, host time per call (run3; 'before' = run2)", gpu_time_table),
                      ("static estimate vs measurement, same config (run2 sweep)", calibration_table),
                      ("GEMV sweep (run2)", sweep_table), ("other", other_rows)):
        print(f"\n### {title}\n")
        fn()
