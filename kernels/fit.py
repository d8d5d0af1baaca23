"""What the masked-attention kernels' tiles fit on a GPU, checked before a launch (no Triton import).

Every program of the masked kernels holds whole (Q, d) tiles: q and the output accumulator, in the backward also
dO and the dQ accumulator, staged in shared memory for the tensor-core products. Compiled offline for sm_90
(``python -m kernels.resources``; 227 KiB of shared memory per program at most), counting a tile's bytes ×3 in
fp32 (tf32x3 splits every operand in three):

- forward (and its combine step): every shape up to 96 KiB counted with rows of at most 256 bytes fits (fp32
  Q = 128, d = 64; bf16 Q = 256, d = 128); the combine step at bf16 Q = 128, d = 256 (512-byte rows) does not;
- backward: up to 48 KiB (fp32 Q = 128, d = 32; bf16 Q = 128, d = 128 or Q = 256, d = 64); no config fits fp32
  Q = 128, d = 64 or Q = 256, d = 32, nor bf16 Q = 128, d = 256, and at bf16 Q = 256, d = 128 one config fits
  with 1 KiB to spare, too little to count on.

Shapes beyond these raise in ``kernels.masked_attention`` instead of failing in the launch, and the model's
dispatch (``qd_core.attention``) runs them with the PyTorch path. The model's own heads (d = 32, Q = 100) fit: in
bf16/fp16 with room to spare, in fp32 with the backward's tiles exactly at its limit (Q rounds up to 128 rows).
"""
from __future__ import annotations

import torch

_TILE_BYTES = {False: 96 * 1024, True: 48 * 1024}  # backward: False / True
_MAX_ROW_BYTES = 256
_FP32_OPERAND_COPIES = 3


def _tile(n: int) -> int:
    """The kernels' tile side for n: the next power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, 1 << (n - 1).bit_length())


def counted_tile_bytes(rows: int, cols: int, element_size: int) -> int:
    """Bytes of a (tile(rows), tile(cols)) operand tile as these limits count them: ×3 in fp32 (4-byte elements),
    whose tensor-core products run as tf32x3. The agent kernels bound their whole K/V tiles the same way."""
    return _tile(rows) * _tile(cols) * element_size * (_FP32_OPERAND_COPIES if element_size == 4 else 1)


def masked_tiles_fit(dtype: torch.dtype, queries: int, head_dim: int, *, backward: bool) -> bool:
    """Whether the masked kernels run ``queries`` × ``head_dim`` heads in ``dtype`` (with ``backward``: the
    backward too)."""
    size = torch.finfo(dtype).bits // 8
    return (_tile(head_dim) * size <= _MAX_ROW_BYTES
            and counted_tile_bytes(queries, head_dim, size) <= _TILE_BYTES[backward])
