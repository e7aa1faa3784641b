"""FP8 fine-grained mixed precision (DeepSeek-V3 section 3.3): tiles and blocks.

E4M3 everywhere, one scale per small group of values so that one outlier costs precision
only in its own group:
- activations (and activation gradients): one scale per 1x128 tile, per token per 128
  channels, from the tile's online max-abs;
- weights: one scale per 128x128 block. A block is the same block of W and of W^T, so the
  backward pass reuses the forward's FP8 weight without quantising it again;
- products accumulated in FP32; embedding, output head, gate, norms and attention scores
  stay in higher precision; master weights stay FP32.

Scales are stored as `scale_inv` (dequantise by multiplying), as in the released
DeepSeek-V3 checkpoints, whose big weights are E4M3 with one `weight_scale_inv` per block.

Two implementations of the FP8 matmul, behind `backend`: `emulate` dequantises the E4M3
operands (exactly: every E4M3 value is an FP32 value) and multiplies in FP32, so CPU runs
have the numerics of the GPU path; `scaled_mm` runs `torch.nn.functional.scaled_mm` with
DeepSeek's blockwise recipes on a GPU that has them (Hopper, CUDA 12.9+), after a probe
checks it against the emulation. `auto` takes the fast one where the probe passed.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model import MLA, MLP

BLOCK = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448

# The linears V3 runs in FP8 (and stores in FP8 in its released checkpoint): attention
# projections and every SwiGLU MLP (dense layers, shared and routed experts).
ATTENTION_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# config.json's entry for a checkpoint in that layout (as in the released DeepSeek-V3).
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}


# ---------------------------------------------------------------------------------------
# Quantise / dequantise: 1x128 tiles (activations) and 128x128 blocks (weights).
# ---------------------------------------------------------------------------------------
def _scale_inv(amax: torch.Tensor) -> torch.Tensor:
    # The group's max-abs maps to E4M3's largest value. An all-zero group gets scale 1, so
    # its values quantise to exact zeros instead of 0/0.
    s = amax / E4M3_MAX
    return s.masked_fill_(s == 0, 1.0)


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of x (or the last one, for rows=0) up to multiples;
    float8 has no pad kernel and its zero bit pattern is +0.0, so its bytes are padded."""
    r = x.shape[-2] if rows else 0
    c = x.shape[-1]
    pad = (0, -c % cols, 0, -r % rows if rows else 0)
    if not any(pad):
        return x
    if x.dtype == E4M3:
        return F.pad(x.view(torch.uint8), pad).view(E4M3)
    return F.pad(x, pad)


def quantize_tiles(x: torch.Tensor, tile: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E4M3 [..., K], scale_inv float32 [..., ceil(K/tile)]): one scale per
    1 x tile group of the last dim. A last partial tile is scaled by its own values."""
    *lead, k = x.shape
    padded = _pad(x.float(), 0, tile)
    tiles = padded.reshape(*lead, padded.shape[-1] // tile, tile)
    scale_inv = _scale_inv(tiles.abs().amax(dim=-1))
    q = (tiles / scale_inv[..., None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3).view(padded.shape)
    return (q[..., :k].contiguous() if padded.shape[-1] != k else q), scale_inv


def dequantize_tiles(
    q: torch.Tensor, scale_inv: torch.Tensor, tile: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_tiles: q [..., K] times its tile's scale_inv."""
    *lead, k = q.shape
    padded = _pad(q, 0, tile).float()
    out = (padded.view(*lead, padded.shape[-1] // tile, tile) * scale_inv.float()[..., None]).view(padded.shape)
    return (out[..., :k] if padded.shape[-1] != k else out).to(dtype)


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (E4M3 weights, scale_inv [ceil(out/block), ceil(in/block)]), scales
    from each block's max-abs (the layout of the released checkpoints)."""
    out_f, in_f = w.shape
    padded = _pad(w.detach().float(), block, block)
    nb_o, nb_i = padded.shape[0] // block, padded.shape[1] // block
    blocks = padded.view(nb_o, block, nb_i, block)
    scale_inv = _scale_inv(blocks.abs().amax(dim=(1, 3)))
    q = (blocks / scale_inv[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3).view(padded.shape)
    return (q[:out_f, :in_f].contiguous() if padded.shape != w.shape else q), scale_inv


def dequantize_blockwise(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w [out, in] in FP8 and scale_inv [ceil(out/block), ceil(in/block)] -> w in `dtype`."""
    out_f, in_f = w.shape
    padded = _pad(w, block, block).float()
    nb_o, nb_i = padded.shape[0] // block, padded.shape[1] // block
    out = (padded.view(nb_o, block, nb_i, block) * scale_inv.float()[:, None, :, None]).view(padded.shape)
    return (out[:out_f, :in_f] if padded.shape != w.shape else out).to(dtype)


# ---------------------------------------------------------------------------------------
# The FP8 matmul: a @ b.T with FP32 accumulation, emulated or on the GPU.
# ---------------------------------------------------------------------------------------
def fp8_matmul(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_blocks: bool, backend: str = "auto"
) -> torch.Tensor:
    """a @ b.T in float32, both operands E4M3 with the contraction dim K last.

    a [M, K] has 1x128-tile scales [M, ceil(K/128)]; b [N, K] has 128x128-block scales
    [ceil(N/128), ceil(K/128)] (b_blocks) or 1x128-tile scales [N, ceil(K/128)].
    """
    if backend not in ("auto", "emulate", "scaled_mm"):
        raise ValueError(f"fp8 backend '{backend}' (expected auto, emulate or scaled_mm)")
    if backend != "emulate" and a_q.is_cuda:
        out_dtype = scaled_mm_support(a_q.device)
        if out_dtype is not None:
            try:
                return _scaled_mm_nt(a_q, a_s, b_q, b_s, b_blocks, out_dtype).float()
            except RuntimeError as e:  # a shape the kernel refuses: same numbers, slower
                warnings.warn(f"fp8: scaled_mm failed ({e}); using the emulated FP8 matmul", stacklevel=2)
        elif backend == "scaled_mm":
            raise RuntimeError("fp8: this GPU / torch build has no blockwise-scaled FP8 matmul")
    elif backend == "scaled_mm":
        raise RuntimeError("fp8: backend 'scaled_mm' needs a CUDA tensor")
    a = dequantize_tiles(a_q, a_s)
    b = dequantize_blockwise(b_q, b_s) if b_blocks else dequantize_tiles(b_q, b_s)
    with torch.autocast(a.device.type, enabled=False):  # the accumulation is FP32 by definition
        return a @ b.t()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _scaled_mm_nt(a_q, a_s, b_q, b_s, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b.T on the GPU with DeepSeek's recipes (1x128 x 128x128 or 1x128 x 1x128).

    The kernel wants K a multiple of 128 and the scales outer-dim-major; zero padding of the
    operands adds nothing to the products, and padded scale entries are 1.
    """
    m, k = a_q.shape
    n = b_q.shape[0]
    mp, np_ = _round_up(m, 16), _round_up(n, BLOCK if b_blocks else 16)
    kt = _round_up(k, BLOCK) // BLOCK
    a = _pad(a_q, 16, BLOCK).contiguous()
    b = _pad(b_q, BLOCK if b_blocks else 16, BLOCK).contiguous()  # row-major [N, K]: b.t() is column-major
    sa = F.pad(a_s.float(), (0, 0, 0, mp - m), value=1.0).t().contiguous().t()  # [M, K/128], stride [1, M]
    if b_blocks:
        l4 = _round_up(kt, 4)
        sb = F.pad(b_s.float(), (0, l4 - kt)).t()  # [L4, N/128], stride [1, L4]
        recipe_b = F.ScalingType.BlockWise128x128
    else:
        sb = F.pad(b_s.float(), (0, 0, 0, np_ - n), value=1.0).t().contiguous().t()
        recipe_b = F.ScalingType.BlockWise1x128
    out = F.scaled_mm(a, b.t(), sa, F.ScalingType.BlockWise1x128, sb, recipe_b, output_dtype=out_dtype)
    return out[:m, :n]


@functools.cache
def scaled_mm_support(device: torch.device) -> torch.dtype | None:
    """The output dtype with which blockwise `scaled_mm` works on this device, or None.

    A probe, not a capability table: it multiplies awkward shapes both ways and keeps the
    fast path only if it matches the emulation. (cuBLAS has the 1x128 / 128x128 recipes on
    sm_90 with CUDA 12.9+; sm_89 has FP8 matmuls but not these scalings.)
    """
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return None
    if torch.cuda.get_device_capability(device) < (8, 9):
        return None
    g = torch.Generator(device=device).manual_seed(0)
    a_q, a_s = quantize_tiles(torch.randn(200, 384, device=device, generator=g))
    b = torch.randn(320, 384, device=device, generator=g)
    operands = [(*quantize_blockwise(b), True), (*quantize_tiles(b), False)]

    def agrees(b_q, b_s, b_blocks, out_dtype) -> bool:
        ref = fp8_matmul(a_q, a_s, b_q, b_s, b_blocks, backend="emulate")
        try:
            got = _scaled_mm_nt(a_q, a_s, b_q, b_s, b_blocks, out_dtype).float()
        except (RuntimeError, TypeError, ValueError):
            return False
        return ((got - ref).norm() / ref.norm()).item() < 1e-2

    for out_dtype in (torch.float32, torch.bfloat16):
        if all(agrees(*op, out_dtype) for op in operands):
            return out_dtype
    return None


# ---------------------------------------------------------------------------------------
# FP8Linear: training in FP8 with FP32 master weights.
# ---------------------------------------------------------------------------------------
class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with the three GEMMs of a linear layer in FP8 (V3 figure 6).

    Fprop  y  = x W^T:     x in 1x128 tiles along K, W in 128x128 blocks.
    Dgrad  dx = dy W:      dy in 1x128 tiles along N (per token per 128 output channels),
                           W^T in the same 128x128 blocks (the forward's FP8 W, transposed).
    Wgrad  dW = dy^T x:    the contraction is over tokens, so both operands are tiled along
                           the token dim: dy^T and x^T in 1x128 tiles, i.e. 128 tokens x 1
                           channel of dy and x. As in V3, x is kept in FP8 (its 1x128 tiles)
                           between forward and backward, and is dequantised, transposed and
                           requantised in 128x1 tiles for this GEMM.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        x_q, x_s = quantize_tiles(x2)
        w_q, w_s = quantize_blockwise(weight)
        y = fp8_matmul(x_q, x_s, w_q, w_s, b_blocks=True, backend=backend)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.backend, ctx.has_bias, ctx.dtypes = backend, bias is not None, (x.dtype, weight.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        n = grad_out.shape[-1]
        g = grad_out.reshape(-1, n)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = quantize_tiles(g)
            grad_x = fp8_matmul(g_q, g_s, w_q.t(), w_s.t(), b_blocks=True, backend=ctx.backend)
            grad_x = grad_x.to(x_dtype).view(*grad_out.shape[:-1], x_q.shape[-1])
        if ctx.needs_input_grad[1]:
            gt_q, gt_s = quantize_tiles(g.t())
            xt_q, xt_s = quantize_tiles(dequantize_tiles(x_q, x_s).t())
            grad_w = fp8_matmul(gt_q, gt_s, xt_q, xt_s, b_blocks=False, backend=ctx.backend).to(w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.float().sum(0).to(w_dtype)
        return grad_x, grad_w, grad_b, None


class FP8Linear(nn.Linear):
    """nn.Linear whose forward and backward matmuls run in FP8 (tiles and blocks).

    The parameters are nn.Linear's (`weight`, `bias`), kept in full precision as the master
    weights: state dicts, optimizers and checkpoints do not change. The FP8 copy of the
    weight is made from the master weight on every forward.
    """

    backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFunction.apply(x, self.weight, self.bias, self.backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """An FP8Linear sharing `linear`'s parameter objects (optimizer state stays valid)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new


def fp8_linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every linear V3 runs in FP8: the
    attention projections of each MLA and the gate/up/down of each SwiGLU MLP (dense
    layers, shared and routed experts, MTP blocks included). Not the embedding, the output
    head, the MoE gate, the norms or MTP's eh_proj."""
    found = []
    for name, module in model.named_modules():
        attrs = ATTENTION_LINEARS if isinstance(module, MLA) else MLP_LINEARS if isinstance(module, MLP) else ()
        for attr in attrs:
            if isinstance(getattr(module, attr, None), (nn.Linear, FP8WeightLinear)):
                found.append((f"{name}.{attr}" if name else attr, module, attr))
    return found


def fp8_swap(model: nn.Module, backend: str = "auto") -> list[str]:
    """Train in FP8: replace the attention and expert linears of `model` with FP8Linear, in
    place, keeping their parameter objects. Returns the names of the swapped modules."""
    swapped = []
    for name, parent, attr in fp8_linears(model):
        old = getattr(parent, attr)
        if type(old) is nn.Linear:
            new = FP8Linear.from_linear(old)
            new.backend = backend
            setattr(parent, attr, new)
            swapped.append(name)
    return swapped


# ---------------------------------------------------------------------------------------
# FP8WeightLinear: inference with the weights stored in FP8 (the released checkpoints).
# ---------------------------------------------------------------------------------------
class FP8WeightLinear(nn.Module):
    """A linear whose weight stays E4M3 in memory (1 byte per value, half of bf16) with one
    float32 `weight_scale_inv` per 128x128 block: the released checkpoints' layout and key
    names. The forward dequantises the weight block by block for this one matmul (CPU), or
    quantises the input in 1x128 tiles and runs the FP8 matmul (GPU with `scaled_mm`)."""

    backend: str = "auto"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device=None, dtype: torch.dtype = torch.bfloat16
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=E4M3, device=device), requires_grad=False
        )
        blocks = (-(-out_features // BLOCK), -(-in_features // BLOCK))
        self.register_buffer("weight_scale_inv", torch.ones(blocks, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8WeightLinear:
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q, s = quantize_blockwise(w)
        new.weight = nn.Parameter(q, requires_grad=False)
        new.weight_scale_inv = s.to(w.device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend != "emulate" and x.is_cuda and scaled_mm_support(x.device) is not None:
            x_q, x_s = quantize_tiles(x.reshape(-1, self.in_features))
            y = fp8_matmul(x_q, x_s, self.weight, self.weight_scale_inv, b_blocks=True, backend=self.backend)
            y = y.view(*x.shape[:-1], self.out_features)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        w = dequantize_blockwise(self.weight, self.weight_scale_inv, dtype=x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating tensor, float8 included: keep the
        # E4M3 storage (the round trip through bf16/fp16/fp32 is exact) and the fp32 scales.
        scale = self.weight_scale_inv
        super()._apply(fn, recurse)
        if self.weight.dtype != E4M3:
            self.weight = nn.Parameter(self.weight.detach().to(E4M3), requires_grad=False)
        if self.weight_scale_inv.dtype != torch.float32:
            self.weight_scale_inv = scale.to(self.weight_scale_inv.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Weight absorption (MLA `absorb`) reads kv_b_proj.weight as a dense matrix, so that one
# stays in high precision for inference, as in DeepSeek's reference code, which
# dequantises it for the absorbed path.
KEEP_DENSE_FOR_INFERENCE = ("kv_b_proj",)


def to_fp8_weights(model: nn.Module) -> list[str]:
    """Serve with FP8 weights: replace the V3 FP8 linears (but kv_b_proj) with
    FP8WeightLinear, in place, quantising their weights per 128x128 block."""
    swapped = []
    for name, parent, attr in fp8_linears(model):
        old = getattr(parent, attr)
        if attr in KEEP_DENSE_FOR_INFERENCE or not isinstance(old, nn.Linear):
            continue
        setattr(parent, attr, FP8WeightLinear.from_linear(old))
        swapped.append(name)
    return swapped


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (FP8 weights count 1 byte, plus their scales)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class WeightMemory:
    """Bytes of one model's weights in bf16 and after to_fp8_weights: the linears that went to
    FP8 (E4M3 weights plus float32 block scales against bf16 weights) and the whole model."""

    bf16_linears: int
    fp8_linears: int
    bf16_model: int
    fp8_model: int

    @classmethod
    def compare(cls, bf16: nn.Module, fp8: nn.Module) -> WeightMemory:
        names = [n for n, m in fp8.named_modules() if isinstance(m, FP8WeightLinear)]
        return cls(
            sum(weight_bytes(bf16.get_submodule(n)) for n in names),
            sum(weight_bytes(fp8.get_submodule(n)) for n in names),
            weight_bytes(bf16),
            weight_bytes(fp8),
        )

    @property
    def linears_ratio(self) -> float:
        return self.fp8_linears / self.bf16_linears if self.bf16_linears else math.nan

    @property
    def model_ratio(self) -> float:
        return self.fp8_model / self.bf16_model
