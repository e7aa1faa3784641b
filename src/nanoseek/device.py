"""Where a model runs and in which dtype: the one reading of `--device` / `--dtype` and of
the `device` / `dtype` config keys, and the one way a model is moved there.

- device: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`.
- dtype: `float32`, `bfloat16`, or `float16` on a GPU only (PyTorch's CPU kernels for
  float16 are slow or missing, and bfloat16 has the same size with float32's range).

A model keeps its buffers' dtypes when its parameters change dtype: the aux-loss-free
routing bias (`e_score_correction_bias`, V3 section 2.1.2) is added to sigmoid scores and
moves by a small gamma per step, so it stays float32 as in the released checkpoints; the
RoPE frequencies stay float32 too, and FP8 weights (E4M3 with float32 block scales) stay FP8.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from nanoseek.errors import NanoseekError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def resolve_device(device: str | torch.device | None, key: str = "--device") -> torch.device:
    """The torch.device that `device` names (None: `auto`); `key` names the setting in errors."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise NanoseekError(f"{key}: '{device}' is not one of auto, cpu, cuda (or cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise NanoseekError(f"{key}: {device} was asked for, but torch sees no GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise NanoseekError(f"{key}: {device} was asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, key: str = "--dtype") -> torch.dtype | None:
    """The torch.dtype that `dtype` names (None stays None: the model's own), checked against
    the device it will run on."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name, resolved = str(dtype).removeprefix("torch."), dtype
    else:
        name, resolved = dtype, DTYPES.get(dtype)
    if resolved not in DTYPES.values():
        raise NanoseekError(f"{key}: '{name}' is not one of {', '.join(DTYPES)}")
    if resolved == torch.float16 and device.type != "cuda":
        raise NanoseekError(f"{key}: float16 runs on a GPU only; on the CPU use bfloat16 or float32")
    return resolved


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's (non-FP8) weights: what its activations are computed in."""
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype not in FP8_DTYPES]
    return dtypes[0] if dtypes else torch.float32


@torch.no_grad()
def place_model(model: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Move `model` in place to `device` and its floating-point parameters to `dtype` (None:
    unchanged); buffers and FP8 weights keep their dtypes (see the module's docstring)."""
    if device is not None:
        model.to(device)
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype not in FP8_DTYPES and p.dtype != dtype:
                p.data = p.data.to(dtype)  # in place: tied weights and holders of `p` see the change
    return model


def add_device_arguments(
    parser: argparse.ArgumentParser,
    dtypes: tuple[str, ...] = tuple(DTYPES),
    dtype_help: str = "dtype of the weights and the cache; float16 on a GPU only",
) -> None:
    """`--device` and `--dtype` (default float32) for a command that loads a model."""
    g = parser.add_argument_group("device")
    g.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N (default auto)",
    )
    g.add_argument("--dtype", default="float32", choices=dtypes, help=f"{dtype_help} (default float32)")


def device_arguments(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """(device, dtype) of the `--device` / `--dtype` arguments, checked."""
    device = resolve_device(args.device, "--device")
    return device, resolve_dtype(args.dtype, device, "--dtype")
