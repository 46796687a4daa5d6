"""Results a person can read: the console table, results.md and the plots.

Each table row is one case; each provider column holds its median time in ms
(or why there is none: "n/a", "not installed", "error[i]" with the message
listed under the table); "floor" is the case's floor in ms, "qt/floor" how far
qlora_triton is from it, and "bnb/qt", "bf16/qt" how many times faster
qlora_triton is than bitsandbytes and than dense bf16 (above 1: qlora_triton wins).
"""

from __future__ import annotations

import math
import pathlib
import statistics
from typing import Any

from .providers import PROVIDERS

_CELL_STATUS = {"n/a": "n/a", "not installed": "not installed"}


def _cases(doc: dict[str, Any]) -> list[tuple[str, dict[str, dict]]]:
    """[(case id, {provider: row})] in run order."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in doc["results"]:
        by_case.setdefault(row["case"], {})[row["provider"]] = row
    return list(by_case.items())


def _fmt_ms(ms: float) -> str:
    return f"{ms:.4g}"


def _ratio(num: dict | None, den: dict | None) -> str:
    if num and den and num["status"] == "ok" and den["status"] == "ok":
        return f"{num['ms'] / den['ms']:.3g}"
    return ""


def _table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and the numbered error notes shared by console and markdown."""
    providers = list(doc["providers"])
    header = ["op", "shape", "M", *providers, "floor", "bound", "qt/floor", "bnb/qt", "bf16/qt"]
    notes: list[str] = []
    rows = []
    for _, cells in _cases(doc):
        first = next(iter(cells.values()))
        line = [first["op"], first["shape"], str(first["m"]) if first["m"] is not None else first["variant"]]
        for p in providers:
            row = cells.get(p)
            if row is None:
                line.append("")
            elif row["status"] == "ok":
                line.append(_fmt_ms(row["ms"]))
            elif row["status"] == "error":
                note = f"{p}: {row['error']}"
                if note not in notes:
                    notes.append(note)
                line.append(f"error[{notes.index(note) + 1}]")
            else:
                line.append(_CELL_STATUS[row["status"]])
        qt = cells.get("qlora_triton")
        line += [_fmt_ms(first["floor_ms"]), first["bound"],
                 f"{qt['x_floor']:.3g}" if qt and qt["x_floor"] is not None else "",
                 _ratio(cells.get("bitsandbytes"), qt), _ratio(cells.get("bf16"), qt)]
        rows.append(line)
    return header, rows, notes


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per op (and optimizer variant): how many cases qlora_triton ran, the
    geometric-mean speedup of qlora_triton over each other provider (over the
    cases both ran), the median and worst distance from the floor."""
    others = [p for p in doc["providers"] if p != "qlora_triton"]
    header = ["op", "cases", "qt ok", *[f"{p}/qt" for p in others], "median qt/floor", "worst qt/floor"]
    groups: dict[str, list[dict[str, dict]]] = {}
    for _, cells in _cases(doc):
        first = next(iter(cells.values()))
        groups.setdefault(" ".join(x for x in (first["op"], first["variant"]) if x), []).append(cells)
    rows = []
    for name, case_cells in groups.items():
        qts = [c["qlora_triton"] for c in case_cells if c.get("qlora_triton", {}).get("status") == "ok"]
        line = [name, str(len(case_cells)), str(len(qts))]
        for p in others:
            ratios = [c[p]["ms"] / c["qlora_triton"]["ms"] for c in case_cells
                      if c.get(p, {}).get("status") == "ok" and c.get("qlora_triton", {}).get("status") == "ok"]
            g = _geomean(ratios)
            line.append(f"{g:.3g}" if g is not None else "")
        floors = sorted(q["x_floor"] for q in qts if q["x_floor"] is not None)
        worst = max(qts, key=lambda q: q["x_floor"] or 0.0) if qts else None
        line.append(f"{statistics.median(floors):.3g}" if floors else "")
        line.append(f"{worst['x_floor']:.3g} ({worst['case']})" if worst and worst["x_floor"] else "")
        rows.append(line)
    return header, rows


def rates(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """(TFLOP/s, GB/s) of an "ok" row: its flops, and the case's fewest bytes
    (the weight counted in its packed NF4 form, for every provider), over its
    time; the GB/s compares directly with the measured copy ceiling. None
    where there is no time (or, for TFLOP/s, no matrix product)."""
    if row["status"] != "ok" or not row["ms"]:
        return None, None
    seconds = row["ms"] * 1e-3
    return (row["flops"] / seconds / 1e12 if row["flops"] else None), row["bytes"] / seconds / 1e9


def rates_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One line per (case, provider): time, TFLOP/s, GB/s, rel_err, time over
    the floor, and ``vs <p>`` = p's time / this time (above 1: this one is
    faster) for each other provider; the per-op scripts print this table."""
    providers = list(doc["providers"])
    header = ["op", "shape", "M", "provider", "ms", "TFLOP/s", "GB/s", "rel_err", "x_floor",
              *[f"vs {p}" for p in providers]]
    rows = []
    for _, cells in _cases(doc):
        for p, row in cells.items():
            tflops, gbps = rates(row)
            line = [row["op"], row["shape"], str(row["m"]) if row["m"] is not None else row["variant"], p,
                    _fmt_ms(row["ms"]) if row["status"] == "ok" else row["status"],
                    f"{tflops:.3g}" if tflops is not None else "", f"{gbps:.4g}" if gbps is not None else "",
                    f"{row['rel_err']:.2g}" if row["rel_err"] is not None else "",
                    f"{row['x_floor']:.3g}" if row["x_floor"] is not None else ""]
            line += ["" if other == p else _ratio(cells.get(other), row) for other in providers]
            rows.append(line)
    return header, rows


def per_provider_console(doc: dict[str, Any]) -> str:
    """The per-op scripts' table: one line per (case, provider), then the summary."""
    meta, ceil = doc["meta"], doc["ceilings"]
    lines = [f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}",
             f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.2f} TFLOP/s; "
             "GB/s: the case's fewest bytes (weight packed) over the time; vs <p>: p's time / this time", ""]
    lines += _plain_table(*rates_table(doc))
    lines += _summary_lines(doc)
    return "\n".join(lines)


def _summary_lines(doc: dict[str, Any]) -> list[str]:
    return ["", "summary (geometric-mean speedup of qlora_triton over each provider; above 1: qlora_triton wins)",
            *_plain_table(*summary_rows(doc))]


def _plain_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def console_table(doc: dict[str, Any]) -> str:
    header, rows, notes = _table(doc)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    meta, ceil = doc["meta"], doc["ceilings"]
    lines = [f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | "
             f"bitsandbytes {meta['bitsandbytes']} | torchao {meta['torchao']} | {meta['date']}",
             f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.2f} TFLOP/s; "
             "times in ms (median)", "", fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    lines += [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    lines += _summary_lines(doc)
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(doc: dict[str, Any], plots: list[pathlib.Path]) -> str:
    meta, ceil = doc["meta"], doc["ceilings"]
    header, rows, notes = _table(doc)
    md = [f"# Benchmarks: {meta['gpu']}, {meta['date'][:10]}", ""]
    md += [f"- {k}: `{meta[k]}`" for k in ("date", "gpu", "driver", "cuda", "python", "torch", "triton",
                                           "bitsandbytes", "torchao", "qlora_triton", "git_commit",
                                           "git_dirty", "smoke", "timer", "command")]
    md += ["", f"Ceilings measured in this run: device copy {ceil['copy_GBps']:.1f} GB/s "
               f"({ceil['copy_bytes'] / 2**20:.0f} MiB read + written), bf16 matmul "
               f"{ceil['matmul_TFLOPs']:.2f} TFLOP/s ({ceil['matmul_size']}^3, random data).", "",
           "## Summary", "",
           "Per op: cases run by qlora_triton, geometric-mean speedup of qlora_triton over each provider "
           "(over the cases both ran; above 1: qlora_triton wins), median and worst time over the floor.", ""]
    md += _md_table(*summary_rows(doc))
    md += ["", "## Time (ms, median of one call)", "",
           "`floor`: max(fewest bytes / copy bandwidth, flops / matmul rate); `qt/floor`: qlora_triton's time "
           "over it; `bnb/qt`, `bf16/qt`: speedup of qlora_triton over bitsandbytes and dense bf16.", ""]
    md += _md_table(header, rows)
    if notes:
        md += ["", "Errors:", ""] + [f"{i + 1}. `{n}`" for i, n in enumerate(notes)]
    md += ["", "## Rates (per provider)", "",
           "TFLOP/s: matrix flops over the time; GB/s: the case's fewest bytes (the weight counted packed, "
           "for every provider) over the time, comparable with the copy ceiling; `vs <p>`: p's time over "
           "this row's time (above 1: this row is faster).", ""]
    md += _md_table(*rates_table(doc))
    est = estimate_rows(doc)
    if est:
        md += ["", "## Static sm_90 estimates beside the measurement", "",
               "**Compile-time estimates**, not measurements: the SASS profile "
               "(`scripts/sm90_sass.py`, committed report named in `sass_estimate.source`) of the "
               "kernel and config qlora_triton picks for the case, bf16 x; `est bound`: its largest "
               "bound (issue, LSU, shared memory) over the HBM floor, `qt/floor`: this run's "
               "measured time over its floor.", ""]
        md += _md_table(["case", "kernel", "config", "Triton", "instr/wt", "est bound", "qt/floor"], est)
    mem = _memory_rows(doc)
    if mem:
        md += ["", "## Peak memory (MB)", "",
               "Torch allocator peak of one call, counted from before the case's tensors were built "
               "(weight in the provider's format, inputs, outputs, state, workspace); in brackets the "
               "device memory in use after the call by cudaMemGetInfo, which also counts CUDA managed "
               "memory (paged optimizer state) that the allocator does not see.", ""]
        md += _md_table(["op", "shape", "M", *doc["providers"]], mem)
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(md) + "\n"


def estimate_rows(doc: dict[str, Any]) -> list[list[str]]:
    """qlora_triton rows that carry a static sm_90 estimate, with the measured ratio."""
    out = []
    for r in doc["results"]:
        e = r.get("sass_estimate")
        if r["provider"] == "qlora_triton" and e:
            measured = f"{r['x_floor']:.2f}" if r.get("x_floor") is not None else "-"
            out.append([r["case"], e["kernel"], e["config"], e["triton"],
                        f"{e['thread_instr_per_weight']:.2f}", f"{e['bound_over_floor']:.2f}", measured])
    return out


def _memory_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for _, cells in _cases(doc):
        if not any(r["peak_mem_MB"] is not None for r in cells.values()):
            continue
        first = next(iter(cells.values()))
        line = [first["op"], first["shape"], str(first["m"]) if first["m"] is not None else first["variant"]]
        for p in doc["providers"]:
            r = cells.get(p)
            if r is None or r["peak_mem_MB"] is None:
                line.append(r["status"] if r and r["status"] != "ok" else "")
            else:
                line.append(f"{r['peak_mem_MB']:.1f} [{r['resident_mem_MB']:.0f}]")
        rows.append(line)
    return rows


# -- plots --------------------------------------------------------------------------------
def write_plots(doc: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """speedup-vs-M per shape for the two matmuls, and memory bars; returns the
    files written (none where there is nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for op in ("matmul_fwd", "matmul_grad_input"):
        path = _speedup_plot(doc, op, out / f"{op}_speedup.png")
        if path:
            written.append(path)
    path = _memory_plot(doc, out / "memory.png")
    if path:
        written.append(path)
    return written


def _speedup_plot(doc: dict[str, Any], op: str, path: pathlib.Path) -> pathlib.Path | None:
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["op"] == op]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    others = [p for p in PROVIDERS if p != "qlora_triton" and p in doc["providers"]]
    ok = {(r["shape"], r["m"], r["provider"]): r for r in rows if r["status"] == "ok"}
    if not any(k[2] == "qlora_triton" for k in ok):
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False, sharey=True)
    for ax, shape in zip(axes[0], shapes):
        ms = sorted({r["m"] for r in rows if r["shape"] == shape})
        for other in others + ["floor"]:
            xs, ys = [], []
            for m in ms:
                qt = ok.get((shape, m, "qlora_triton"))
                if other == "floor":
                    ref_ms = qt["floor_ms"] if qt else None
                else:
                    ref = ok.get((shape, m, other))
                    ref_ms = ref["ms"] if ref else None
                if qt and ref_ms:
                    xs.append(m)
                    ys.append(ref_ms / qt["ms"])
            if xs:
                style = dict(ls="--", color="gray") if other == "floor" else dict(marker="o")
                ax.plot(xs, ys, label=f"vs {other}" if other != "floor" else "floor / qt", **style)
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("M (rows of x)")
    axes[0][0].set_ylabel("speedup of qlora_triton (x)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{op}: {doc['meta']['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _memory_plot(doc: dict[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """Peak memory of the LoRA layer at its largest M per shape and of the optimizer steps."""
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, float]] = {}
    lora = [r for r in doc["results"] if r["op"] == "lora_fwd_bwd"]
    for shape in dict.fromkeys(r["shape"] for r in lora):
        m = max(r["m"] for r in lora if r["shape"] == shape)
        for r in lora:
            if r["shape"] == shape and r["m"] == m and r["peak_mem_MB"] is not None:
                groups.setdefault(f"LoRA {shape}\nM={m}", {})[r["provider"]] = r["peak_mem_MB"]
    for r in doc["results"]:
        if r["op"] == "optimizer_step" and r["resident_mem_MB"] is not None:
            # managed (paged) state is not in the allocator's peak: take the larger
            value = max(r["peak_mem_MB"] or 0.0, r["resident_mem_MB"])
            groups.setdefault(f"AdamW {r['variant']}\n{r['shape']}", {})[r["provider"]] = value
    if not groups:
        return None
    providers = [p for p in PROVIDERS if p in doc["providers"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [g.get(p, 0.0) for g in groups.values()], width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=7)
    ax.set_ylabel("peak device memory (MB)")
    ax.set_title(f"memory: {doc['meta']['gpu']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
