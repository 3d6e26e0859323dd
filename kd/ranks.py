"""Several processes over one data set: torchrun's ranks, or one process per local device.

Each rank scores a disjoint share of the rows and writes its own shards; a gloo group (which
works with and without GPUs) only carries the end of the run: the data statistics, a barrier,
then rank 0 merges the partial manifests. Training (kd.distributed) joins NCCL for gradients;
the teacher pass needs no collective on the device, and its one barrier must wait out the
ranks' different finishing times, hence a group of its own with a long timeout.
`run_per_device` starts the same ranks from a single command on one machine, one process per
listed device.
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A rank that finished waits this long at the final barrier for the slowest one.
BARRIER_TIMEOUT = datetime.timedelta(hours=2)


class RankError(RuntimeError):
    """A rank of a multi-process run failed; the message names the rank, device and error."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env() -> Ranks:
    """This process's rank as torchrun (or `run_per_device`) sets it; one rank otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    values = {}
    for name in names:
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    world = values.get("WORLD_SIZE", 1)
    rank = values.get("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return Ranks(rank, world, values.get("LOCAL_RANK", rank))


class Group:
    """The process group of a run: joined on entry when there are several ranks and none is
    joined yet (and then left on exit); a group the caller made is used as it is."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self._owned = False

    def __enter__(self) -> Group:
        if self.ranks.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(
                    "gloo",
                    rank=self.ranks.rank,
                    world_size=self.ranks.world_size,
                    timeout=BARRIER_TIMEOUT,
                )
                self._owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.ranks.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (small objects: statistics, summaries)."""
        if not self.ranks.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(out, value)
        return out


# --------------------------------------------------------------------------------------------
# One process per device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(target, args, kwargs, rank, devices, port, threads, conn) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(len(devices)),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(len(devices)),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        result = target(*args, device=devices[rank], **kwargs)
        conn.send(("ok", result))
    except BaseException as exc:  # report anything, KeyboardInterrupt included, then exit
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, ValueError | OSError | KeyboardInterrupt):
            message = "".join(traceback.format_exception(exc)).rstrip()
        conn.send(("error", f"{type(exc).__name__}: {message}" if message else ""))
        raise SystemExit(1) from None
    finally:
        conn.close()


def run_per_device(
    target: Callable[..., Any],
    devices: list[str],
    *args: Any,
    cpu_threads: int | None = None,
    **kwargs: Any,
) -> Any:
    """Run `target(*args, device=DEVICE, **kwargs)` in one spawned process per device, as
    ranks 0..n-1 of one group on this machine; returns rank 0's result.

    If a rank fails, the others are stopped and RankError names the rank, its device and its
    error. CPU ranks share the cores (`cpu_threads` each, default cores / ranks).
    """
    if len(devices) < 2:
        raise ValueError(f"devices={devices!r}: name at least two (one process each)")
    if cpu_threads is None and all(d.startswith("cpu") for d in devices):
        cpu_threads = max(1, (os.cpu_count() or 1) // len(devices))
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes, pipes = [], []
    for rank in range(len(devices)):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_child,
            args=(target, args, kwargs, rank, devices, port, cpu_threads, send),
            name=f"kd-rank{rank}",
        )
        process.start()
        send.close()
        processes.append(process)
        pipes.append(receive)
    results: dict[int, tuple[str, Any]] = {}
    try:
        waiting = {p.sentinel: r for r, p in enumerate(processes)}
        waiting.update({pipe: r for r, pipe in enumerate(pipes)})
        while waiting:
            for ready in multiprocessing.connection.wait(list(waiting)):
                rank = waiting.pop(ready, None)
                if rank is None:
                    continue
                if ready is pipes[rank]:
                    _receive(pipes[rank], rank, results)
                    continue
                processes[rank].join()
                if waiting.pop(pipes[rank], None) is not None:  # its message may be unread
                    _receive(pipes[rank], rank, results)
                status, message = results.get(rank, ("error", ""))
                if processes[rank].exitcode != 0 or status != "ok":
                    message = message or f"exited with status {processes[rank].exitcode}"
                    raise RankError(f"rank {rank} ({devices[rank]}) failed: {message}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        for pipe in pipes:
            pipe.close()
    return results[0][1]


def _receive(pipe, rank: int, results: dict) -> None:
    try:
        if pipe.poll(0.5):
            results[rank] = pipe.recv()
    except (EOFError, OSError):
        pass
