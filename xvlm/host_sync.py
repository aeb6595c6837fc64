"""Find the operations of a piece of code that make the host wait for the device.

On a GPU, an operation whose result the Python program needs (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``)
or whose output size depends on the data (``nonzero``, ``unique``, boolean-mask indexing, ``masked_select``)
blocks the CPU until every queued kernel has run: the GPU then idles while the CPU prepares the next launches.
CUDA's own check (``torch.cuda.set_sync_debug_mode``) needs a GPU; :func:`record_host_syncs` finds the same
operations on any device, so a CPU test can assert that a training step has none. It records, for each such call,
the operation and the innermost frame of the calling code outside torch.

Reads of CPU tensors are counted too: the check cannot know where a tensor would live on a GPU run, and code
written for the device has no reason to read a tensor back in its step.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "record_host_syncs"]

_aten = torch.ops.aten
SYNCING_OPS = frozenset({
    _aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    _aten.nonzero.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.masked_select.default,
    _aten.is_nonzero.default,
    _aten.equal.default,
})
"""ATen operations whose result the host must wait for: a scalar read back, or an output sized by the data."""


@dataclass(frozen=True)
class HostSync:
    """One operation that waits for the device: its name and the calling line (``file:line in function``)."""

    op: str
    where: str


def _caller() -> str:
    """The innermost stack frame outside torch and this module, as ``file:line in function``."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_sync.py"):
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "?"


def _reads_by_mask(func: Any, args: tuple[Any, ...]) -> bool:
    """``x[mask]`` with a boolean mask: its output size depends on the mask's values."""
    if func is not _aten.index.Tensor or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func in SYNCING_OPS or _reads_by_mask(func, args):
            self.record(str(func))
        elif func is _aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None:
            self.record(f"{func} without output_size")
        return func(*args, **(kwargs or {}))


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") == "tolist":  # the other reads reach the dispatcher
            self.record("Tensor.tolist")
        return func(*args, **(kwargs or {}))


@contextmanager
def record_host_syncs() -> Iterator[list[HostSync]]:
    """Record every operation in the block that would make the host wait for the device.

    Yields the list the records are appended to. Example::

        with record_host_syncs() as syncs:
            loss = module.losses(batch)["loss"]
            loss.backward()
        assert not syncs, syncs
    """
    syncs: list[HostSync] = []

    def record(op: str) -> None:
        syncs.append(HostSync(op, _caller()))

    with ExitStack() as stack:
        stack.enter_context(_FunctionRecorder(record))
        stack.enter_context(_DispatchRecorder(record))
        yield syncs
