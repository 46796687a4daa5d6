"""The end-to-end fine-tune (qlora_triton.finetune): a reduced run, the tiny preset, the CLI.

These run the whole flow on the CPU at a toy size: the point is that it runs,
that fine-tuning lowers the held-out loss and that the summary is complete;
the default-size numbers are in the README, not asserted here.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_triton.cli import main as cli_main
from qlora_triton.finetune import FinetuneConfig, run, run_preset
from qlora_triton.finetune import data as D
from qlora_triton.finetune import bf16_matmul, presets, report
from qlora_triton.finetune.report import COMPARISON_KEYS, PHASE_KEYS, SUMMARY_KEYS

ROOT = Path(__file__).resolve().parents[1]

# A model small enough that three processes (pre-train + two phases) take seconds.
TEST_SIZE = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 2, "num_hidden_layers": 2,
             "eval_windows": 16, "task1_sentences": 2000, "task2_sentences": 1000}


def test_tasks_are_deterministic_and_different():
    assert D.task_text(2, 50, seed=7) == D.task_text(2, 50, seed=7)
    assert D.task_text(2, 50, seed=7) != D.task_text(2, 50, seed=8)
    t1, t2 = D.task_text(1, 200, seed=1), D.task_text(2, 200, seed=1)
    assert " was " in t2 and " by " in t2 and " was " not in t1
    tok = D.CharTokenizer()
    assert tok.decode(tok.encode(t1)) == t1
    stream = D.TokenStream.from_text(t2, tok)
    starts = stream.batch_starts(5, 3, 32, seed=0)
    assert torch.equal(starts, stream.batch_starts(5, 3, 32, seed=0))  # one data order for both phases
    assert stream.batch(starts[0], 32).shape == (3, 32)


def test_read_jsonl_needs_text(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "a b"}\n\n{"text": "c"}\n')
    assert D.read_text_file(str(good)) == "a b\nc\n"
    bad = tmp_path / "e.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="text"):
        D.read_text_file(str(bad))
    with pytest.raises(ValueError, match=".txt or .jsonl"):
        D.read_text_file(__file__)


def test_reduced_run_lowers_loss_and_summary_is_complete(tmp_path):
    # 20 steps: training and held-out windows are packed per sentence, so the
    # cross-sentence predictions that a 12-step run improved first are not scored.
    config = FinetuneConfig(device="cpu", steps=20, pretrain_steps=15, batch_size=8, seq_len=32, lr=1e-2,
                            eval_every=6, output_dir=str(tmp_path / "run"), save_adapter="", quiet=True,
                            size=dict(TEST_SIZE))
    summary = run(config)
    out = tmp_path / "run"
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(on_disk)
    assert set(COMPARISON_KEYS) <= set(on_disk["comparison"])
    assert (out / on_disk["plot"]).stat().st_size > 0
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out / "pretrained")  # the base it trained on
    assert adapter_config["task_type"] == "CAUSAL_LM"
    for method in ("lora16", "qlora"):
        phase = on_disk["phases"][method]
        assert set(PHASE_KEYS) <= set(phase), method
        assert len(phase["train_loss"]) == 20
        assert all(torch.isfinite(torch.tensor(phase["train_loss"])))
        # Fine-tuning must clearly lower the held-out task-2 loss.
        assert phase["final_eval_loss"] < 0.95 * phase["initial_eval_loss"], method
        assert phase["tokens_per_s"] > 0 and phase["memory"]["peak_bytes"] > 0
        # both phases ran their bf16 matmuls the one way the run resolved (bf16_matmul.py)
        assert phase["bf16_matmul"] == on_disk["config"]["bf16_matmul"] == bf16_matmul.resolve("auto", "cpu")
        if phase["bf16_matmul"] == "fp32":
            assert phase["widened_ops"].get("aten.mm.default", 0) > 0, method
        else:
            assert phase["widened_ops"] == {}, method
    q, l = on_disk["phases"]["qlora"], on_disk["phases"]["lora16"]
    assert q["trainable_params"] == l["trainable_params"]  # the same LoRA on the same layers
    assert q["weight_bytes"] < l["weight_bytes"]
    assert summary["comparison"]["eval_loss_ratio"] == pytest.approx(q["final_eval_loss"] / l["final_eval_loss"])
    table = report.table(on_disk)
    assert "20 x 8 x 32" in table and bf16_matmul.describe(on_disk["config"]["bf16_matmul"]) in table
    assert "Pre-training (fp32, task 1): 15 x 8 x 32" in table


def test_preset_tiny_on_cpu(tmp_path):
    result = run_preset("tiny", device="cpu", steps=2, output_dir=str(tmp_path), quiet=True)
    saved = json.loads((tmp_path / "preset-tiny.json").read_text())
    for key in ("step_seconds_median", "memory", "weight_bytes", "build_seconds", "losses", "estimate_bytes"):
        assert key in saved
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    # NF4 linears (+ bf16 embeddings/head, fp32 LoRA): well below the dense bf16 model.
    shape = presets.LLAMA_SHAPES["tiny"]
    dense_bf16 = (presets.linear_params(shape) + 2 * shape.vocab_size * shape.hidden_size) * 2
    assert result["weight_bytes"] < 0.75 * dense_bf16
    assert result["lora_params"] == presets.lora_params(presets.LLAMA_SHAPES["tiny"], 8)


@pytest.mark.parametrize("liger", [True, False])
def test_preset_times_the_16bit_lora_baseline(tmp_path, liger):
    result = run_preset("tiny", device="cpu", steps=3, output_dir=str(tmp_path), quiet=True, lora16=True,
                        liger=liger)
    saved = json.loads((tmp_path / "preset-tiny.json").read_text())
    base = saved["lora16"]
    assert base["lora_params"] == result["lora_params"]  # PEFT's LoRA on the same seven projections, same r
    # The QLoRA run's Liger option (on the CPU: the chunked loss) for the baseline too.
    assert ("liger" in result["speedups"]) == liger and base["liger"] == ("torch" if liger else None)
    assert len(base["step_seconds"]) == len(base["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(base["losses"])))
    # Random weights of the same init: both start near log(vocab) on the same random tokens.
    vocab = presets.LLAMA_SHAPES["tiny"].vocab_size
    assert abs(base["losses"][0] - result["losses"][0]) < 0.05 * math.log(vocab)
    assert base["step_seconds_median"] == statistics.median(base["step_seconds"][1:])
    assert saved["vs_lora16"]["step_time"] == pytest.approx(saved["step_seconds_median"] / base["step_seconds_median"])
    assert saved["vs_lora16"]["peak_memory"] is None  # the CPU's peak RSS is the process's (see _versus)
    assert base["estimate_bytes"] > result["estimate_bytes"]["total"]  # dense bf16 against NF4 linears


def test_preset_skips_the_baseline_that_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(presets, "lora16_bytes", lambda *args: 2**60)
    result = run_preset("tiny", device="cpu", steps=2, lora16=True, liger=False)
    assert "needs about" in result["lora16"]["skipped"] and result["vs_lora16"] == {}
    assert "16-bit LoRA baseline skipped: needs about" in capsys.readouterr().out


def test_lora16_needs_a_preset(capsys):
    assert cli_main(["finetune", "--lora16"]) == 2
    assert "--lora16" in capsys.readouterr().err


def test_big_preset_refuses_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(presets, "available_bytes", lambda device: 2**30)
    with pytest.raises(MemoryError, match="65b.*GiB"):
        run_preset("65b", device="cpu", quiet=True)
    with pytest.raises(ValueError, match="preset"):
        run_preset("71b", device="cpu", quiet=True)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(device="cpu", steps=0).resolve()
    with pytest.raises(ValueError, match="dropout"):
        FinetuneConfig(device="cpu", dropout=1.5).resolve()
    with pytest.raises(ValueError, match="bf16_matmul"):
        FinetuneConfig(device="cpu", bf16_matmul="fast").resolve()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["finetune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--data", "--r", "--alpha", "--steps", "--batch-size", "--seq-len",
                   "--output-dir", "--save-adapter", "--preset", "--device", "--seed"):
        assert option in text
    proc = subprocess.run([sys.executable, "-m", "qlora_triton.finetune", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--preset" in proc.stdout


def test_cli_passes_given_options_and_keeps_defaults(monkeypatch):
    import qlora_triton.finetune as F

    seen = {}

    def fake_run(config):
        seen["config"] = config
        return {"plot": "loss.png"}

    def fake_run_preset(name, **kwargs):
        seen["preset"] = name, kwargs

    monkeypatch.setattr(F, "run", fake_run)
    monkeypatch.setattr(F, "run_preset", fake_run_preset)
    assert cli_main(["finetune", "--device", "cpu", "--output-dir", "o", "--lr", "0.03", "--r", "4"]) == 0
    config = seen["config"]
    assert (config.lr, config.r, config.dropout, config.backend) == (0.03, 4, 0.0, "auto")
    assert config.bf16_matmul == "auto"
    assert cli_main(["finetune", "--device", "cpu", "--bf16-matmul", "native"]) == 0
    assert seen["config"].bf16_matmul == "native"
    assert cli_main(["finetune", "--preset", "tiny", "--lr", "0.001", "--steps", "3"]) == 0
    name, kwargs = seen["preset"]
    assert (name, kwargs["lr"], kwargs["steps"]) == ("tiny", 0.001, 3)


@pytest.mark.parametrize("option", [["--data", "x.txt"], ["--model", "m"], ["--dropout", "0.1"],
                                    ["--pretrain-steps", "5"], ["--save-adapter"], ["--backend", "torch"],
                                    ["--bf16-matmul", "fp32"]])
def test_preset_refuses_options_it_does_not_use(option, capsys):
    assert cli_main(["finetune", "--preset", "tiny", *option]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and option[0] in err


def test_phase_processes_start_early_and_end_when_not_used(tmp_path, monkeypatch):
    # run() starts both phase processes before pre-training (their imports overlap it);
    # when the run fails before a phase is handed over, the waiting process exits unused.
    from qlora_triton.finetune import train as T

    started = []

    class Recorded(T.PhaseProcess):
        def __init__(self, method, out):
            super().__init__(method, out)
            started.append(self)

    def failing_prepare(config, out):
        raise ValueError("prepare failed on purpose")

    monkeypatch.setattr(T, "PhaseProcess", Recorded)
    monkeypatch.setattr(T, "prepare", failing_prepare)
    config = FinetuneConfig(device="cpu", output_dir=str(tmp_path / "run"), quiet=True, size=dict(TEST_SIZE))
    with pytest.raises(ValueError, match="on purpose"):
        run(config)
    assert [w.method for w in started] == list(T.METHODS)
    for worker in started:
        assert worker.proc.returncode == 0  # ended (cancel waited for it), not killed
        assert not worker.result_path.exists() and not worker.spec_path.exists()


def test_phase_main_usage():
    from qlora_triton.finetune import phase

    assert phase.main(["only-one-argument"]) == 2
    assert phase.main(["--wait", "qlora", "spec.json"]) == 2
