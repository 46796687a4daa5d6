"""The QLoRA fine-tune on several ranks under FSDP2: ``torchrun --nproc_per_node N
-m qlora_triton.finetune [options]``.

torchrun starts N processes and sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
the CLI sees ``WORLD_SIZE > 1`` and runs :func:`run_multirank` on every rank
instead of the one-process flow (which compares QLoRA with 16-bit LoRA in two
phases; on several ranks only QLoRA runs):

1. one process group: NCCL with one GPU per rank when CUDA is there, gloo on
   the CPU;
2. rank 0 prepares the data and, for the bundled model, pre-trains it (as the
   one-process run does) while the others wait;
3. every rank loads the base with :func:`qlora_triton.distributed.load_sharded`
   (each rank quantizes or reads only the NF4 shard it keeps), puts LoRA on it
   and shards it with FSDP2 (:func:`qlora_triton.distributed.shard_model`);
   each rank prints its NF4 base bytes;
4. ``steps`` steps of ``qt.PagedAdamW`` on the global batch (``batch_size``
   sequences per step, split evenly over the ranks: FSDP2 averages the
   gradients, so a step is the one-process step on the whole batch);
5. held-out loss before and after, reduced over the ranks; the adapter saved
   in PEFT's format (every rank takes part, rank 0 writes); rank 0 writes
   ``summary-multirank.json``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from .optimizer import paged_adamw
from .report import write_json
from .train import FinetuneConfig, cosine_schedule, pick_backend, prepare


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when it is not set)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE must be an integer, got {value!r}") from None
    if world < 1:
        raise ValueError(f"the environment variable WORLD_SIZE must be at least 1, got {world}")
    return world


def _init_process_group(config: FinetuneConfig) -> torch.device:
    if config.device is None:
        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} GPUs; "
                             "use --nproc_per_node at most that")
        torch.cuda.set_device(local_rank)
        config.device = f"cuda:{local_rank}"
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # Rank 0 pre-trains the bundled model while the others wait in a
        # barrier: allow that the time it takes.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return torch.device(config.device)


def _reduce_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@torch.no_grad()
def _evaluate(model, batches: list[torch.Tensor], device: torch.device) -> float:
    """Token-weighted held-out loss; each rank takes every world-th window and
    the sums are reduced, so every rank returns the same number."""
    rank, world = dist.get_rank(), dist.get_world_size()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    # Every rank must run the same number of forwards (FSDP2 gathers in each).
    for i in range(0, len(batches), world):
        chunk = batches[i:i + world]
        batch = chunk[rank if rank < len(chunk) else 0].to(device)
        loss = model(input_ids=batch, labels=batch).loss.double()
        if rank < len(chunk):
            n = batch.numel() - batch.shape[0]
            total += torch.stack([loss * n, torch.tensor(float(n), dtype=torch.float64, device=device)])
    dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def run_multirank(config: FinetuneConfig) -> dict:
    """The fine-tune on this rank of ``WORLD_SIZE`` (see the module docstring);
    returns the summary (the same on every rank)."""
    import qlora_triton as qt
    from tqdm.auto import tqdm

    from . import data as data_mod
    from ..distributed import base_bytes, load_sharded

    device = _init_process_group(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    t_start = time.perf_counter()
    if rank == 0:
        config.resolve()
    # One output folder and one set of defaults for all ranks (rank 0's).
    box = [asdict(config) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    config = FinetuneConfig(**{**box[0], "device": str(device)})
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} sequences per step do not split evenly over "
                         f"{world} ranks; use a multiple of {world}")
    out = Path(config.output_dir)
    quiet = config.quiet or rank != 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        info = prepare(config, out)
    box = [info if rank == 0 else None]
    dist.barrier()
    dist.broadcast_object_list(box, src=0)
    info = box[0]

    blob = torch.load(out / "data.pt")
    train = data_mod.TokenStream(blob["train"])
    held_out = data_mod.TokenStream(blob["eval"])
    eval_batches = held_out.eval_batches(config.seq_len, config.batch_size // world,
                                         config.size["eval_windows"])
    backend = pick_backend(config)
    with qt.force_backend(backend) if backend else contextlib.nullcontext():
        # The same initial adapter on every rank (lora_A from one seeded generator).
        model = load_sharded(info["model_dir"], r=config.r, lora_alpha=config.alpha,
                             lora_dropout=config.dropout, compute_dtype=torch.bfloat16,
                             seed=config.seed + 5)
        targets = [name for name, m in model.named_modules() if isinstance(m, qt.LoRALinear4bit)]
        nbytes = base_bytes(model)
        print(f"rank {rank}/{world}: NF4 base {nbytes['local']:,} of {nbytes['total']:,} bytes "
              f"({nbytes['local'] / max(nbytes['total'], 1):.1%})", file=sys.stderr, flush=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = paged_adamw(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        schedule = cosine_schedule(optimizer, config.steps)
        initial = _evaluate(model, eval_batches, device)
        model.train()
        losses, seconds = [], 0.0
        per_rank = config.batch_size // world
        for step in tqdm(range(config.steps), desc=f"QLoRA on {world} ranks", disable=quiet,
                         dynamic_ncols=True, file=sys.stderr):
            rows = blob["starts"][step][rank * per_rank:(rank + 1) * per_rank]
            batch = train.batch(rows, config.seq_len).to(device)
            t0 = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(loss.item())
            seconds += time.perf_counter() - t0
        final = _evaluate(model, eval_batches, device)
        if config.save_adapter:
            qt.save_adapter(model, config.save_adapter)
    every_base = [None] * world
    dist.all_gather_object(every_base, nbytes)
    summary = {
        "world_size": world, "backend": dist.get_backend(), "device": str(device).split(":")[0],
        "model_dir": info["model_dir"], "targets": targets, "config": asdict(config),
        "base_bytes": every_base, "train_loss": _reduce_mean(losses, device),
        "initial_eval_loss": initial, "final_eval_loss": final,
        "train_seconds": seconds,
        "tokens_per_s": config.steps * config.batch_size * config.seq_len / seconds if seconds else 0.0,
        "adapter": config.save_adapter, "wall_seconds": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if rank == 0:
        write_json(out / "summary-multirank.json", summary)
        if not config.quiet:
            print(f"QLoRA on {world} ranks ({summary['backend']}): held-out loss {initial:.4f} -> {final:.4f}, "
                  f"{summary['tokens_per_s']:,.0f} tokens/s; wrote {out / 'summary-multirank.json'}")
    dist.barrier()
    return summary
