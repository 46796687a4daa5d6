"""benchmarks/bench_decode.py on the CPU: the compiled static-cache decode (the
CPU's analogue of a captured CUDA graph: one torch.compile graph for the decode
step, run for every token) gives exactly the eager tokens, and the decode step
is captured once, not once per token."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import bench_decode  # noqa: E402


def test_compiled_decode_gives_the_eager_tokens():
    import qlora_triton as qt

    with torch.no_grad(), qt.force_backend("torch"):
        model = bench_decode.build_model("tiny", 1, torch.device("cpu"), torch.float32, seed=3)
        bench_decode.quantize_model(model, "qlora_triton")
        assert sum(isinstance(m, qt.Linear4bit) for m in model.modules()) == 7
        prompt = torch.randint(1, model.config.vocab_size, (1, 5))
        rows = list(bench_decode.measure(model, "qlora_triton", prompt, new_tokens=6, reps=1,
                                         backend="aot_eager", compile_mode=None))
    eager, compiled = rows
    assert eager["status"] == "ok" and compiled["status"] == "ok", rows
    assert eager["graphs_captured"] == 0
    # prefill and decode: two graphs for six tokens (a recompile per token would be more)
    assert 1 <= compiled["graphs_captured"] <= 2
    assert compiled["tokens_match_eager"] is True and len(compiled["tokens"]) == 6
    assert compiled["tokens"] == eager["tokens"]
    assert len(set(eager["tokens"])) > 1  # not a degenerate constant output
    assert model.forward.__func__ is type(model).forward  # the eager forward is put back


def test_step_bytes_counts_the_nf4_linears_and_the_head():
    with torch.no_grad():
        dense = bench_decode.build_model("tiny", 1, torch.device("cpu"), torch.float32)
        nf4 = bench_decode.build_model("tiny", 1, torch.device("cpu"), torch.float32)
        bench_decode.quantize_model(nf4, "qlora_triton")
    head = dense.lm_head.weight.numel() * 4 + dense.config.hidden_size * 4
    linear_params = sum(m.weight.numel() for m in dense.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert bench_decode.step_bytes(dense, "bf16") == head + 4 * linear_params
    nf4_linear = bench_decode.step_bytes(nf4, "qlora_triton") - head
    assert linear_params / 2 < nf4_linear < linear_params / 2 * 1.05


def test_bad_options_are_named(capsys):
    with pytest.raises(SystemExit):
        bench_decode.main(["--smoke", "--providers", "qlora_triton,nope"])
    assert "--providers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_decode.main(["--smoke", "--new-tokens", "1"])
    assert "--new-tokens" in capsys.readouterr().err


def test_rows_are_appended_as_they_come(tmp_path):
    out = tmp_path / "decode.jsonl"
    out.write_text('{"earlier": 1}\n')
    assert bench_decode.main(["--smoke", "--providers", "bf16", "--layers", "1", "--new-tokens", "3",
                              "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"earlier": 1}
    assert [(r["provider"], r["mode"], r["status"]) for r in rows[1:]] == [("bf16", "eager", "ok"),
                                                                          ("bf16", "compiled", "ok")]
    assert rows[2]["tokens_match_eager"] is True
