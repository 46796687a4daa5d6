"""The GPU check's output folder as one Markdown report, every number read from
its files: what a session writes into ``benchmarks/results/<gpu>-<date>/README.md``
and the closing note of a GPU run (issue 21 asks for the last two sections).

    python -m benchmarks.gpu_report OUT_DIR                 # print
    python -m benchmarks.gpu_report OUT_DIR --out report.md # written atomically

``OUT_DIR`` is what ``benchmarks/gpu_check.sh`` leaves under ``$OUT`` (the device
tool's ``files_at``): ``log.txt``, ``pytest.log``, ``bench/results.json``,
``diag.jsonl``, ``preset/preset-*.json``, ``crossover.json``, ``decode.jsonl``
(or a committed results folder, where ``results.json`` and ``preset-*.json`` lie
flat). A stage that did not run, or was cut short, reads "not run" where its
file is missing. Sections:

* versions, the stage table and pytest's summary;
* the core table (do_bench medians; at M <= 16 those time the host where it is
  slower than the GPU);
* GPU time by CUDA-graph replay at M = 1 and 16 against host time per call;
* the static sm_90 estimate of each decode GEMV that ran (the bench row's
  ``sass_estimate``: the config the launcher picked) beside its GPU time, the
  ratio measured / estimated, and which bound the estimate says binds;
* the LoRA layer (forward + backward, M = 2048) and a two-layer training
  step: host or wall time against GPU-busy time;
* the 7B preset beside 16-bit LoRA, decode, the crossover;
* every case where qlora_triton is slower than bitsandbytes or more than 1.25x
  its floor, by do_bench and by GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

FLOOR_FLAG = 1.25  # "more than 1.25x from its floor"


def _jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["not run (no rows)"]
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _first(out: pathlib.Path, *patterns: str) -> list[pathlib.Path]:
    """The files of the first pattern that matches: the GPU check's layout
    (``bench/``, ``preset/``), else a results folder's flat one."""
    for pattern in patterns:
        found = sorted(out.glob(pattern))
        if found:
            return found
    return []


def _bench(out: pathlib.Path) -> tuple[dict, dict]:
    """(meta, {(case, provider): row}) of bench/results.json, empty when absent."""
    found = _first(out, "bench/results.json", "results.json")
    doc = _json(found[0]) if found else None
    if doc is None:
        return {}, {}
    return doc["meta"], {(r["case"], r["provider"]): r for r in doc["results"]}


def header(out: pathlib.Path, meta: dict) -> list[str]:
    md = [f"# GPU check report: `{out}`", ""]
    keys = ("gpu", "driver", "cuda", "python", "torch", "triton", "bitsandbytes", "git_commit", "date")
    md.append("Versions (bench/results.json): " + (", ".join(f"{k} {meta.get(k)}" for k in keys) if meta
                                                   else "not run"))
    log = out / "log.txt"
    stages = []
    if log.exists():
        lines = log.read_text().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("stage ") and "status" in line]
        if starts:
            stages = [line for line in lines[starts[-1]:] if line.strip()]
    md += ["", "Stages (log.txt):", "", "```", *(stages or ["not run"]), "```"]
    pytest_log = out / "pytest.log"
    if pytest_log.exists():
        text = pytest_log.read_text().splitlines()
        summary = [line for line in text if re.search(r"\d+ (passed|failed)", line)]
        failed = [line for line in text if line.startswith(("FAILED", "ERROR"))]
        md += ["", "pytest -m gpu: " + (summary[-1].strip("= ") if summary else "no summary line (cut short?)")]
        md += [f"- {line}" for line in failed]
    else:
        md += ["", "pytest -m gpu: not run"]
    return md


def core_rows(rows: dict) -> list[list[str]]:
    out = []
    for (case, provider), r in rows.items():
        if provider != "qlora_triton" or r.get("ms") is None:
            continue
        bnb, bf16 = rows.get((case, "bitsandbytes"), {}), rows.get((case, "bf16"), {})
        speedup = lambda o: _f(o["ms"] / r["ms"]) if o.get("ms") else "n/a"  # noqa: E731
        label = r["variant"] or (str(r["m"]) if r["m"] is not None else "-")
        out.append([r["op"], r["shape"], label, _f(r["ms"], 4), _f(bnb.get("ms"), 4), _f(bf16.get("ms"), 4),
                    _f(r.get("floor_ms"), 4), _f(r.get("x_floor")), speedup(bnb), speedup(bf16)])
    return out


def _graph(diag: list[dict]) -> dict:
    return {(r["N"], r["K"], r["M"], r["provider"]): r for r in diag if r.get("part") == "host_vs_gpu"}


def _floors_us(rows: dict) -> dict:
    """{(N, K, M): floor in us} of the matmul_fwd cases."""
    return {(r["n"], r["k"], r["m"]): r["floor_ms"] * 1e3 for r in rows.values()
            if r["op"] == "matmul_fwd" and r.get("floor_ms")}


def graph_rows(diag: list[dict], rows: dict) -> list[list[str]]:
    graph, floors = _graph(diag), _floors_us(rows)
    out = []
    for (N, K, M) in sorted({key[:3] for key in graph}):
        qt, bnb, bf = (graph.get((N, K, M, p), {}) for p in ("qlora_triton", "bitsandbytes", "bf16"))
        floor = floors.get((N, K, M))
        g = qt.get("graph_us")
        ratio = lambda o: _f(o["graph_us"] / g) if g and o.get("graph_us") else "n/a"  # noqa: E731
        out.append([f"{N}x{K}", str(M), _f(floor, 1), _f(g, 1), _f(bnb.get("graph_us"), 1),
                    _f(bf.get("graph_us"), 1), _f(g / floor) if g and floor else "n/a", ratio(bnb), ratio(bf),
                    _f(qt.get("host_us"), 0), _f(bnb.get("host_us"), 0), _f(bf.get("host_us"), 0)])
    return out


def estimate_rows(diag: list[dict], rows: dict) -> list[list[str]]:
    """Each decode GEMV row that carries its static estimate, beside its GPU time."""
    graph = _graph(diag)
    out = []
    for (case, provider), r in rows.items():
        e = r.get("sass_estimate")
        if provider != "qlora_triton" or not e:
            continue
        floor_us = e.get("floor_us") or r["floor_ms"] * 1e3
        est_us = e["bound_over_floor"] * floor_us
        measured = graph.get((r["n"], r["k"], r["m"], "qlora_triton"), {}).get("graph_us")
        out.append([f"{r['shape']} M={r['m']}", e["kernel"], e["config"], e["triton"], e.get("binding", "n/a"),
                    _f(e["bound_over_floor"], 3), _f(est_us, 1), _f(measured, 1),
                    _f(measured / est_us) if measured else "n/a"])
    return out


def busy_rows(diag: list[dict], part: str, time_key: str) -> list[list[str]]:
    out = []
    for r in diag:
        if r.get("part") != part:
            continue
        what = (f"{r['N']}x{r['K']} M={r['M']} {r['provider']}" if part == "lora_host_vs_gpu"
                else f"{r['preset']} x{r['layers']} layers, {r['tokens']} tokens, {r['method']} {r.get('speedups', '')}")
        if "error" in r:
            out.append([what, "error: " + r["error"][:100], "", "", ""])
            continue
        t, busy = r[time_key], r["busy_us"]
        out.append([what, _f(t, 0), _f(busy, 0), _f(t / busy) if busy else "n/a", _f(r["kernels"], 1)])
    return out


def preset_lines(out: pathlib.Path) -> list[str]:
    files = _first(out, "preset/preset-*.json", "preset-*.json")
    if not files:
        return ["not run"]
    lines = []
    for path in files:
        p = json.loads(path.read_text())
        lines.append(f"- {p['preset']} on {p['device_name']}, batch {p['batch_size']} x {p['seq_len']}, "
                     f"speedups {p['speedups']}: QLoRA step {p['step_seconds_median'] * 1e3:.1f} ms "
                     f"(steps {[round(s * 1e3, 1) for s in p['step_seconds']]} ms, the first warm-up), "
                     f"{p['tokens_per_s']:.0f} tokens/s, peak {p['memory']['peak_bytes'] / 2**30:.2f} GiB "
                     f"(estimate {p['estimate_bytes']['total'] / 2**30:.2f} GiB)")
        base = p.get("lora16")
        if base is None:
            lines.append("- 16-bit LoRA: not run")
        elif "skipped" in base:
            lines.append(f"- 16-bit LoRA: skipped ({base['skipped']})")
        else:
            vs = p["vs_lora16"]
            mem = (f", peak {base['memory']['delta_bytes'] / 2**30:.2f} GiB (QLoRA {vs['peak_memory']:.2f}x)"
                   if vs.get("peak_memory") is not None else "")
            lines.append(f"- 16-bit LoRA ({base['method']}, liger {base.get('liger')}): step "
                         f"{base['step_seconds_median'] * 1e3:.1f} ms (QLoRA takes {vs['step_time']:.2f}x){mem}")
    return lines


def decode_lines(out: pathlib.Path) -> list[str]:
    rows = _jsonl(out / "decode.jsonl")
    if not rows:
        return ["not run"]
    return [f"- {r['provider']} {r['mode']}: " + (f"{r['ms_per_token']:.2f} ms/token ({r['layers']} layers of "
                                                    f"{r['preset']})" if r["status"] == "ok"
                                                    else r["status"].splitlines()[0][:160]) for r in rows]


def crossover_lines(out: pathlib.Path) -> list[str]:
    doc = _json(out / "crossover.json")
    if doc is None:
        return ["not run"]
    return [f"{len(doc['rows'])} rows, {'complete' if doc['complete'] else 'cut short'}"] + [
        f"- {c['bucket']} {c['dtype']}: dequant from M = {c['dequant_from_m']}" for c in doc["crossover"]]


def flagged(diag: list[dict], rows: dict) -> list[str]:
    """Every case where qlora_triton is slower than bitsandbytes, or more than
    FLOOR_FLAG x its floor: by do_bench (bench rows) and by GPU time (graph replay)."""
    lines = []
    for (case, provider), r in rows.items():
        if provider != "qlora_triton" or r.get("ms") is None:
            continue
        bnb = rows.get((case, "bitsandbytes"), {}).get("ms")
        why = []
        if bnb and bnb < r["ms"]:
            why.append(f"{bnb / r['ms']:.2f}x bitsandbytes' speed")
        if r.get("x_floor") and r["x_floor"] > FLOOR_FLAG:
            why.append(f"{r['x_floor']:.2f}x its floor")
        if why:
            lines.append(f"- do_bench {case}: {r['ms']:.4f} ms, " + ", ".join(why))
    graph, floors = _graph(diag), _floors_us(rows)
    for (N, K, M, provider), r in sorted(graph.items()):
        g = r.get("graph_us")
        if provider != "qlora_triton" or not g:
            continue
        bnb = graph.get((N, K, M, "bitsandbytes"), {}).get("graph_us")
        floor = floors.get((N, K, M))
        why = []
        if bnb and bnb < g:
            why.append(f"{bnb / g:.2f}x bitsandbytes' speed")
        if floor and g / floor > FLOOR_FLAG:
            why.append(f"{g / floor:.2f}x its floor")
        if why:
            lines.append(f"- GPU time {N}x{K} M={M}: {g:.1f} us, " + ", ".join(why))
    return lines or ["none"]


def report(out: pathlib.Path) -> str:
    out = pathlib.Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"OUT_DIR: {out} is not a folder")
    meta, rows = _bench(out)
    diag = _jsonl(out / "diag.jsonl")
    md = header(out, meta)
    md += ["", "## Core table (do_bench median)", ""]
    md += _table(["op", "shape", "M", "qlora_triton ms", "bitsandbytes ms", "bf16 ms", "floor ms", "qt/floor",
                  "bnb/qt", "bf16/qt"], core_rows(rows))
    md += ["", "## GPU time (CUDA-graph replay) and host time per call", ""]
    md += _table(["shape", "M", "floor us", "qt GPU us", "bnb GPU us", "bf16 GPU us", "qt/floor", "bnb/qt",
                  "bf16/qt", "qt host us", "bnb host us", "bf16 host us"], graph_rows(diag, rows))
    md += ["", "## Static estimate (compile-time) against GPU time, same kernel, shape and config", ""]
    md += _table(["case", "kernel", "config", "Triton", "binds (est.)", "est. bound/floor", "est. us",
                  "GPU us", "measured/est."], estimate_rows(diag, rows))
    md += ["", "## LoRA layer forward + backward: host time against GPU-busy time (torch.profiler)", ""]
    md += _table(["case", "host us", "GPU-busy us", "host/busy", "kernels"],
                 busy_rows(diag, "lora_host_vs_gpu", "host_us"))
    md += ["", "## Training step: wall time against GPU-busy time", ""]
    md += _table(["step", "wall us", "GPU-busy us", "wall/busy", "kernels"],
                 busy_rows(diag, "step_wall_vs_gpu", "wall_us"))
    md += ["", "## 7B preset and 16-bit LoRA", "", *preset_lines(out)]
    md += ["", "## Decode", "", *decode_lines(out)]
    md += ["", "## Crossover", "", *crossover_lines(out)]
    md += ["", f"## Slower than bitsandbytes, or more than {FLOOR_FLAG}x the floor", "", *flagged(diag, rows)]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="the GPU check's output folder ($OUT; the device tool's files_at)")
    p.add_argument("--out", help="write the report here (atomically) instead of printing it")
    args = p.parse_args(argv)
    try:
        text = report(pathlib.Path(args.out_dir))
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    if args.out:
        target = pathlib.Path(args.out)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
