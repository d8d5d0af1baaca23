"""2-D sine positional encoding (DETR / mmdet ``SinePositionalEncoding`` with offset 0, no padding mask)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qd_core.constants import cached_constant


def sine_position_encoding(b: int, h: int, w: int, num_feats: int, *, temperature: float = 10000.0,
                           normalize: bool = True, scale: float = 2 * math.pi,
                           device: torch.device | str | None = None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """Sine/cosine encoding of the row and column of every pixel of an h×w map.

    Position (row i, column j) is counted from 1 (cumsum of ones); with ``normalize`` it becomes
    i / (h + 1e-6) · scale, so the last row/column sits just below ``scale``. Channel 2k of each half is
    sin(pos / T^(2k/F)) and channel 2k+1 is cos(pos / T^(2k/F)) (interleaved, T = temperature, F = num_feats).

    Args:
        b: batch size of the result (the encoding is the same for every image; the batch is an expand, so a
            traced ``x.shape[0]`` stays dynamic).
        h, w: map size.
        num_feats: channels per axis (even); the result has 2·num_feats channels, (pos_y, pos_x) in that order.
        temperature, normalize, scale: as in DETR.
        device, dtype: of the result; the math is done in fp32 and cast at the end.
    Returns:
        (B, 2·num_feats, h, w), an expanded view of an encoding kept for the next call with the same arguments
        (``qd_core.constants``): read it, do not write into it.
    """
    if num_feats <= 0 or num_feats % 2:
        raise ValueError(f"num_feats={num_feats}: expected a positive even number (sin/cos pairs)")
    if h <= 0 or w <= 0:
        raise ValueError(f"h, w = {h}, {w}: expected a positive map size")

    # ~20 small operations each, six per forward, always the same for a given input size: made once.
    device = torch.device(device) if device is not None else None
    pos = cached_constant(("sine", h, w, num_feats, temperature, normalize, scale, device, dtype),
                          lambda: _encode(h, w, num_feats, temperature, normalize, scale, device, dtype))
    return pos.unsqueeze(0).expand(b, -1, -1, -1)


def _encode(h: int, w: int, num_feats: int, temperature: float, normalize: bool, scale: float,
            device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """The (2·num_feats, h, w) encoding (see sine_position_encoding)."""
    ones = torch.ones(h, w, dtype=torch.float32, device=device)
    y_embed = ones.cumsum(0)
    x_embed = ones.cumsum(1)
    if normalize:
        # eps keeps the division finite; it also keeps the last position strictly below `scale`, as in DETR.
        eps = 1e-6
        y_embed = y_embed / (y_embed[-1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, -1:] + eps) * scale
    k = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)  # (F,), pairs share a frequency
    pos_x = x_embed[:, :, None] / dim_t
    pos_y = y_embed[:, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).to(dtype)  # (2F, h, w)
