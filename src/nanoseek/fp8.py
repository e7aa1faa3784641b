"""FP8 fine-grained quantisation (V3 section 3.3): weights in 128x128 blocks, activations in 1x128 tiles.

The released DeepSeek-V3 checkpoints store each large weight in float8 E4M3 with one
`weight_scale_inv` per 128x128 block: w = w_fp8 * scale_inv, block by block.
"""

from __future__ import annotations

import torch

BLOCK = 128
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def dequantize_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [out, in] in FP8 and scale_inv [ceil(out/block), ceil(in/block)] -> w in `dtype`."""
    out_f, in_f = w.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (w.float() * scale).to(dtype)


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (E4M3 weights, scale_inv per block), scales from each block's max-abs."""
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // block), -(-in_f // block)
    padded = w.new_zeros(nb_o * block, nb_i * block, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(nb_o, block, nb_i, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(nb_o * block, nb_i * block)[:out_f, :in_f].contiguous(), scale_inv
