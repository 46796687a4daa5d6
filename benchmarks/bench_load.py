"""Host memory of loading a checkpoint: quantize-on-load (``NF4Config``) beside
transformers' dense load.

Writes a random-weight bf16 LLaMA checkpoint (about ``--size-gb``) to a folder,
then loads it in a fresh Python process per method and reports, above that
process's RSS just before the load (imports done):

* ``hwm``: the high-water RSS (``VmHWM``, every page the process ever held),
* ``anon``: the peak of anonymous memory (``RssAnon`` sampled every 2 ms): what
  the load allocates, without the checkpoint's file pages that a memory-mapped
  read maps in (clean page cache, counted in RSS while mapped),
* ``all read``: the high-water RSS once every tensor of the loaded model has been
  read (transformers leaves the weights it did not convert as views of its
  memory map, resident only once read).

Methods: ``dense`` (``AutoModelForCausalLM.from_pretrained(folder, dtype=bf16)``),
``nf4`` (the same with ``quantization_config=qt.NF4Config()``: transformers reads
the safetensors file through mmap), ``nf4-pread`` (``qt.from_pretrained`` with
``read="pread"``: each tensor read into its own buffer, no file pages mapped).

    python benchmarks/bench_load.py                      # 1 GB checkpoint in a temp folder
    python benchmarks/bench_load.py --size-gb 2 --out results.json
    python benchmarks/bench_load.py --smoke              # a few MB, for CI

The NF4 loads quantize on the CPU with the plain-torch reference (run without
``TRITON_INTERPRET``) unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METHODS = ("dense", "nf4", "nf4-pread")


def llama_shape(size_gb: float) -> dict:
    """A LLaMA config of at least ``size_gb`` GB in bf16 (hidden 2048; layers added until it is).
    The vocabulary (8000) keeps the embeddings and head, which stay bf16, at about
    the share they have in LLaMA-7B (6% here, 4% there), not a quarter of the file."""
    hidden, inter, vocab = 2048, 5632, 8000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab)


SMOKE_SHAPE = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=1024)


def make_checkpoint(folder: Path, shape: dict) -> int:
    """Config + one bf16 safetensors file of random weights (made tensor by tensor
    from the meta model's shapes: no model is built); returns the file's size."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in meta.state_dict().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    path = folder / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path.stat().st_size


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(method: str, folder: str, device: str) -> dict:
    """One load in this process (see the module docstring); returns the numbers."""
    import torch
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before the baseline)

    import qlora_triton as qt
    import qlora_triton.hf_quantizer  # noqa: F401

    qt.nf4_codebook()
    baseline_rss, baseline_anon = _status("VmRSS"), _status("RssAnon")
    peak_anon, done = [baseline_anon], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    kwargs = dict(dtype=torch.bfloat16, device_map={"": device})
    if method == "dense":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    elif method == "nf4":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=qt.NF4Config(),
                                                                  **kwargs)
    else:
        model = qt.from_pretrained(folder, quantization_config=qt.NF4Config(), read="pread", **kwargs)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
    layers = sum(isinstance(m, qt.Linear4bit) for m in model.modules())
    loaded = {"method": method, "seconds": seconds, "nf4_layers": layers,
              "hwm_bytes": _status("VmHWM") - baseline_rss, "anon_bytes": peak_anon[0] - baseline_anon}
    # transformers leaves weights it did not convert as views of the memory map: their
    # pages count once read. Read every tensor once, as a first forward would.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.float().sum() if t.is_floating_point() else t.sum()
    loaded["hwm_touched_bytes"] = _status("VmHWM") - baseline_rss
    return loaded


def measure(method: str, folder: Path, device: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # quantize with the torch reference on the CPU, not the interpreter
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(folder), "--device", device],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} load failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_load.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (default 1.0)")
    parser.add_argument("--smoke", action="store_true", help="a few-MB checkpoint (CI)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--device", default="cpu", help="where the model goes (default cpu)")
    parser.add_argument("--folder", help="write the checkpoint here (default: a temp folder, removed after)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.device)))
        return 0
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"--methods: unknown {bad}; expected a subset of {METHODS}")
    if args.size_gb <= 0:
        parser.error(f"--size-gb must be positive, got {args.size_gb}")

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        folder = Path(args.folder or tmp)
        shape = SMOKE_SHAPE if args.smoke else llama_shape(args.size_gb)
        size = make_checkpoint(folder, shape)
        rows = [measure(m, folder, args.device) for m in methods]
    result = {"checkpoint_bytes": size, "shape": shape, "device": args.device, "rows": rows}
    for row in rows:
        for key in ("hwm", "anon", "hwm_touched"):
            row[f"{key}_ratio"] = row[f"{key}_bytes"] / size
    print(f"checkpoint: {size / 1e9:.3f} GB bf16 ({shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}); memory above the process's RSS before the load:")
    print(f"{'method':<10} {'high-water RSS':>18} {'peak anonymous':>18} {'RSS, all read':>18} "
          f"{'seconds':>8} {'NF4 layers':>10}")
    for row in rows:
        cells = " ".join(f"{row[f'{key}_bytes'] / 1e9:>8.3f} GB ({row[f'{key}_ratio']:.2f}x)"
                         for key in ("hwm", "anon", "hwm_touched"))
        print(f"{row['method']:<10} {cells} {row['seconds']:>8.1f} {row['nf4_layers']:>10}")
    if args.out:  # atomically: a reader never sees half a file
        tmp_out = Path(args.out).with_suffix(".tmp")
        tmp_out.write_text(json.dumps(result, indent=2))
        os.replace(tmp_out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
