"""A CUDA device emulated on the CPU, strict about devices, so that device bugs fail on machines without a GPU.

Every tensor "on cuda:0" is a `FakeCudaTensor`: a wrapper whose data lives on the CPU, whose `.device` says
cuda:0, and whose every operation runs through `__torch_dispatch__`. Like real CUDA, an operation that mixes a
cuda:0 tensor with a CPU tensor of one or more dimensions raises "Expected all tensors to be on the same
device"; CPU 0-dim tensors (wrapped scalars), CPU indices for advanced indexing and cross-device copies are
allowed, as on CUDA. `.numpy()` of a cuda:0 tensor raises as on CUDA, and a CPU generator cannot drive a cuda:0
factory. The arithmetic is the CPU's, so results equal a CPU run's: a test can compare them exactly.

The wrapper's C++ device is `meta`, whose device guard is a no-op, so autograd works without a driver.

Use it in-process with `with fake_cuda(): ...`, or as a stand-in `hetmerge` command (`python fake_cuda.py ARGS`
runs the CLI with the emulation on), which lets a whole Snakemake run use `--device cuda:0`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_META = torch.device("meta")
# Ops that accept CPU tensors beside CUDA ones: copies across devices, and CPU index tensors.
_MIXED_OK = {"_to_copy", "copy_", "index", "index_put", "index_put_", "_index_put_impl_"}


class FakeCudaTensor(torch.Tensor):
    """CPU data that presents itself, and behaves towards other devices, as a cuda:0 tensor."""

    _data: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, requires_grad: bool = False) -> FakeCudaTensor:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            layout=data.layout,
            device=_META,
            requires_grad=requires_grad,
        )
        out._data = data
        return out

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def tolist(self) -> Any:  # type: ignore[override]
        return self._data.tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self.numpy()

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return f"FakeCudaTensor({self._data!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _run(func, args, kwargs or {})


def _is_fake_device(device: Any) -> bool:
    return device is not None and torch.device(device).type in ("cuda", "meta")


def _run(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    flat, _ = tree_flatten((args, kwargs))
    fake = any(isinstance(t, FakeCudaTensor) for t in flat)
    cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) and t.dim() > 0]
    name = func.overloadpacket.__name__
    if fake and cpu and name not in _MIXED_OK:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
            f"(in {func}, emulated CUDA)"
        )
    to_fake = _is_fake_device(kwargs.get("device"))
    generator = kwargs.get("generator")
    if to_fake and generator is not None and generator.device.type == "cpu":
        raise RuntimeError(f"Expected a 'cuda' device type for generator but found 'cpu' (in {func}, emulated CUDA)")
    if to_fake:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if name.endswith("_") and args and isinstance(args[0], torch.Tensor):
        return args[0]  # in place: the tensor written to, on its own device
    if "device" in kwargs and not to_fake:  # e.g. .cpu(), .to("cpu"), zeros_like(x, device="cpu")
        return out
    if fake or to_fake:
        return tree_map(_wrap, out)
    return out


def _unwrap(t: Any) -> Any:
    return t._data if isinstance(t, FakeCudaTensor) else t


def _wrap(t: Any) -> Any:
    return FakeCudaTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) else t


class _FactoryMode(TorchDispatchMode):
    """Catches what no FakeCudaTensor takes part in: factories and copies with device=cuda."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _run(func, args, kwargs or {})


def _from_data(make: Any) -> Any:
    """torch.tensor/as_tensor build their result below the dispatcher: build on the CPU, then move."""

    def build(data: Any, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if _is_fake_device(device):
            return make(data, *args, **kwargs).to(CUDA)
        return make(data, *args, device=device, **kwargs)

    return build


class _NoCapture:
    """The emulated device's stream: it never captures a CUDA graph."""

    def is_capturing(self) -> bool:
        return False


@contextlib.contextmanager
def fake_cuda() -> Iterator[torch.device]:
    """Within the block, cuda:0 is an emulated, device-strict CUDA device on the CPU; yields that device."""
    with contextlib.ExitStack() as stack:
        for name, value in {
            "_lazy_init": lambda: None,
            "is_available": lambda: True,
            "device_count": lambda: 1,
            "get_device_name": lambda device=None: "emulated CUDA (tests/fake_cuda.py)",
            "is_bf16_supported": lambda *a, **k: False,  # so `precision: auto` is fp32, as on the CPU
            "synchronize": lambda device=None: None,
            "current_device": lambda: 0,
        }.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        # optimizers ask the accelerator's current stream whether a CUDA graph is being captured: never here
        stack.enter_context(mock.patch.object(torch.accelerator, "current_stream", lambda device=None: _NoCapture()))
        for name in ("tensor", "as_tensor"):
            stack.enter_context(mock.patch.object(torch, name, _from_data(getattr(torch, name))))
        stack.enter_context(_FactoryMode())
        yield CUDA


def is_on_fake_cuda(t: torch.Tensor) -> bool:
    return isinstance(t, FakeCudaTensor)


if __name__ == "__main__":  # a stand-in `hetmerge` command: the CLI with the emulation on
    from hetmerge.cli import main

    with fake_cuda():
        code = main(sys.argv[1:])
    sys.exit(code)
