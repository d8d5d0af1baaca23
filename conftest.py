"""Session-wide test set-up.

Triton decides when a module is imported whether ``@triton.jit`` builds compiled or interpreted kernels, and
importing ``torch._inductor``/``torch._dynamo`` (diffusers, torch.compile and AOTInductor tests do) sets Triton up
in compiled mode. On a machine without CUDA the kernels can only run under the interpreter, so it is chosen here,
before any test module imports anything.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
