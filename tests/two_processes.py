"""Run a check on two CPU processes joined in a gloo process group (forked: a spawned process spends ~10 s
importing torch and xvlm again on a 2-core machine)."""

import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _joined(rank: int, port: int, check: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        check(rank, *args)
    finally:
        dist.destroy_process_group()


def on_two_processes(check: Callable[..., None], *args: object) -> None:
    """Call ``check(rank, *args)`` on ranks 0 and 1 of one process group; a failure on either fails the caller."""
    mp.start_processes(_joined, args=(_free_port(), check, args), nprocs=2, start_method="fork")
