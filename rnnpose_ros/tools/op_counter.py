"""Count ATen operations and host synchronisations of a piece of code, on any device.

The number of ATen operations a refinement dispatches is a device-independent proxy for its launch
overhead on a GPU (each one is at least one kernel launch there); host synchronisations stall the
device queue. Both are counted here without a GPU::

    with OpCounter() as counter:
        refiner.refine(observation, instances)
    print(counter.total_ops, counter.syncs)

- ATen operations: every call that reaches a ``TorchDispatchMode`` (after autograd and composite
  decompositions, i.e. what a device would execute), by name in ``ops``.
- Host synchronisations: calls that need a tensor's value or data on the host — ``.item()``,
  ``bool()``/``int()``/``float()`` of a tensor, ``.tolist()``, ``.numpy()``, ``.cpu()``, and ops
  whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique`` ...). They are
  counted at the Python level (``TorchFunctionMode``), so that a ``.cpu()`` that is free on a CPU
  tensor still counts as the download it would be on a device, and at the dispatch level for
  ``_local_scalar_dense`` reached from C++. By name in ``sync_calls``.

``paused()`` excludes a region (e.g. a host-side rasteriser whose readback is its documented
synchronisation point) from both counts; :class:`UncountedRenderer` wraps a renderer that way.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: Tensor methods that hand a tensor's value or storage to the host.
_SYNC_METHODS: dict[Callable, str] = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
}
#: ATen ops whose output shape depends on tensor values: the host must wait for the device.
_DATA_DEPENDENT_OPS = frozenset(("nonzero", "masked_select", "unique_dim", "_unique2", "unique_consecutive"))
#: Reached for ``.item()`` & co.; counted here only when not already counted at the Python level.
_SCALAR_OP = "_local_scalar_dense"


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, owner: OpCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _SYNC_METHODS.get(func)
        if name is not None and self.owner.counting:
            self.owner.sync_calls[name] += 1
            with self.owner._python_sync():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, owner: OpCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        owner = self.owner
        if owner.counting:
            name = func.overloadpacket.__name__
            owner.ops[name] += 1
            if func.is_view:
                owner.view_ops[name] += 1
            if name in _DATA_DEPENDENT_OPS or (name == _SCALAR_OP and not owner._in_python_sync):
                owner.sync_calls[name] += 1
        return func(*args, **(kwargs or {}))


class OpCounter:
    """Context manager counting ATen ops (``ops``) and host synchronisations (``sync_calls``).

    Attributes:
        ops: op name → number of calls (all ATen ops).
        view_ops: the part of ``ops`` that only makes views (new shape or strides of the same storage:
            no kernel runs on a device).
        sync_calls: kind (``item``, ``cpu``, ``nonzero`` ...) → number of calls.
    """

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.view_ops: Counter[str] = Counter()
        self.sync_calls: Counter[str] = Counter()
        self.counting = True
        self._in_python_sync = False
        self._stack = contextlib.ExitStack()

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def kernel_ops(self) -> int:
        """ATen ops that are not views: what launches work on a device."""
        return self.total_ops - sum(self.view_ops.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_calls.values())

    def reset(self) -> None:
        self.ops.clear()
        self.view_ops.clear()
        self.sync_calls.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside (nesting allowed)."""
        previous, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = previous

    @contextlib.contextmanager
    def _python_sync(self) -> Iterator[None]:
        previous, self._in_python_sync = self._in_python_sync, True
        try:
            yield
        finally:
            self._in_python_sync = previous

    def __enter__(self) -> OpCounter:
        self._stack.enter_context(_FunctionLevel(self))
        self._stack.enter_context(_DispatchLevel(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def summary(self, top: int = 10) -> str:
        """One line: totals and the most frequent ops."""
        common = ", ".join(f"{name} {count}" for name, count in self.ops.most_common(top))
        syncs = ", ".join(f"{name} {count}" for name, count in self.sync_calls.most_common())
        return (
            f"{self.total_ops} ops, {self.kernel_ops} not views ({common}); "
            f"{self.syncs} host syncs ({syncs or 'none'})"
        )


class UncountedRenderer:
    """A renderer whose ``render`` and ``render_tensors`` calls an :class:`OpCounter` does not count
    (the host rasteriser's own transfers), so that the rest of a render iteration can be measured
    alone.

    Args:
        renderer: the wrapped renderer; every other attribute is forwarded to it.
        counter: the counter to pause (may be set later through the attribute).
    """

    def __init__(self, renderer: Any, counter: OpCounter | None = None) -> None:
        self.renderer = renderer
        self.counter = counter

    def render(self, *args: Any, **kwargs: Any) -> Any:
        if self.counter is None:
            return self.renderer.render(*args, **kwargs)
        with self.counter.paused():
            return self.renderer.render(*args, **kwargs)

    def render_tensors(self, *args: Any, **kwargs: Any) -> Any:
        if self.counter is None:
            return self.renderer.render_tensors(*args, **kwargs)
        with self.counter.paused():
            return self.renderer.render_tensors(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.renderer, name)
