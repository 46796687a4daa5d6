"""A pool of worker processes joined in one process group, for the multi-process
tests (gloo on the CPU, NCCL on CUDA).

Starting a process that imports torch, transformers and the package takes
seconds on the 2-CPU machines, so a pool is made once per world size per test
session (the ``dist2`` / ``dist3`` fixtures of ``conftest.py``) and every test
sends it work: ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank, with
the process group already initialized, and returns the ranks' results in
rank order. ``fn`` must be a module-level function (it is pickled by name) and
its arguments and result picklable; a rank's exception is raised in the test
with that rank's traceback. A collective that one rank never reaches fails
after ``timeout`` seconds (the process group's timeout), the pool is then
shut down, and later tests of that world size are told why.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback

import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, timeout: float, tasks, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which raises
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """``world_size`` processes in one process group; see the module docstring."""

    def __init__(self, world_size: int, timeout: float = 120.0) -> None:
        self.world_size, self.timeout = world_size, timeout
        self._dir = tempfile.TemporaryDirectory(prefix="qt-dist-")
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        init_file = os.path.join(self._dir.name, "init")
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, init_file, timeout, self._tasks[r], self._results))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.broken: str | None = None

    def run(self, fn, *args) -> list:
        """``[fn(*args) on rank 0, on rank 1, ...]``."""
        if self.broken:
            raise RuntimeError(f"the {self.world_size}-process pool is shut down: {self.broken}")
        for q in self._tasks:
            q.put((fn, args))
        out: dict[int, object] = {}
        errors = []
        try:
            while len(out) + len(errors) < self.world_size:
                rank, ok, value = self._results.get(timeout=self.timeout + 30)
                if ok:
                    out[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
        except queue.Empty:
            self.broken = f"{fn.__name__} did not finish on every rank within {self.timeout + 30:.0f} s"
            self.close()
            raise RuntimeError(self.broken) from None
        if errors:
            # The other ranks may be stuck in a collective the failed one never
            # reached; the group's timeout frees them, but the pool cannot be
            # trusted to be in step any more.
            self.broken = f"{fn.__name__} failed on {len(errors)} rank(s)"
            self.close()
            raise RuntimeError("\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()
