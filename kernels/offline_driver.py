"""A stand-in CUDA driver for Triton on a machine without a GPU: kernels compile, launches are recorded, not run.

    from kernels.offline_driver import install
    launches = install(arch=90)        # before the first kernel call; TRITON_INTERPRET must be unset
    kernels.agent_attention(q, k, v)   # CPU tensors: compiled for sm_90 (Triton + its bundled ptxas), not run
    launches[-1]                       # Launch(kernel name, grid, arguments as the launcher received them)

What it is for: the host side of a kernel call (argument checks, allocations, Triton's dispatch and autotuner,
``kernels._triton_utils.Launcher``) runs exactly as on a GPU machine up to the launcher, so it can be timed and
its launches compared on any machine. Nothing is computed: outputs stay as allocated. Autotuning cannot time
configs without a GPU, so set ``QD_TRITON_AUTOTUNE=0`` (one config per kernel) before importing the kernels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

INSTALLED = False  # set by install(); kernels/__init__.py then lets CPU tensors reach the compiled kernels


@dataclass(frozen=True)
class Launch:
    """One launch as Triton's launcher received it."""

    kernel: str
    grid: tuple[int, int, int]
    stream: int
    hooks: tuple[Any, Any, Any]  # launch metadata, enter hook, exit hook
    args: tuple  # every kernel parameter in order, constexprs included


class _Launcher:
    """Takes the place of Triton's CUDA launcher for one compiled kernel: records each launch and, as the real
    one does, calls the launch hooks it is given (None: none)."""

    def __init__(self, src: Any, metadata: Any, record: list[Launch] | None) -> None:
        self.name = metadata.name
        self.record = record

    def __call__(self, grid_x: int, grid_y: int, grid_z: int, stream: int, function: Any, packed_metadata: Any,
                 launch_metadata: Any, enter_hook: Any, exit_hook: Any, *args: Any) -> None:
        if enter_hook is not None:
            enter_hook(launch_metadata)
        if self.record is not None:
            self.record.append(Launch(self.name, (grid_x, grid_y, grid_z), stream,
                                      (launch_metadata, enter_hook, exit_hook), args))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class _Utils:
    """The driver utilities Triton calls while loading a compiled kernel (an H100's limits)."""

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        return 1, 1, 128, 0, 1024  # module, function, registers, spills, max threads per block

    def get_device_properties(self, device: int) -> dict:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class OfflineDriver:
    """Triton's ``driver.active`` for a GPU of compute capability ``arch`` that is not there."""

    def __init__(self, arch: int, record: list[Launch] | None) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils()
        self.launcher_cls = lambda src, metadata: _Launcher(src, metadata, record)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self) -> Any:
        return torch.cuda

    def get_benchmarker(self) -> Any:
        raise RuntimeError("the offline driver cannot time kernels: set QD_TRITON_AUTOTUNE=0")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


def install(arch: int = 90, record: bool = True) -> list[Launch]:
    """Make the offline driver Triton's active driver; returns the list each launch is appended to (left empty
    with ``record=False``: a recorded launch keeps its tensors alive, which a timing loop must not do).

    Also sizes the kernels' launch grids for an H100 (132 SMs) instead of asking CUDA. Raises RuntimeError under
    ``TRITON_INTERPRET`` (the interpreter never reaches a driver).
    """
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on"):
        raise RuntimeError("kernels.offline_driver: unset TRITON_INTERPRET (the interpreter does not use a driver)")
    from triton.runtime import driver

    from kernels import _triton_utils

    global INSTALLED
    launches: list[Launch] = []
    INSTALLED = True
    driver.set_active(OfflineDriver(arch, launches if record else None))
    _triton_utils.use_multiprocessors(_Utils().get_device_properties(0)["multiprocessor_count"])
    return launches
