"""Numerical precision: which dtype a run computes in (`model.dtype=auto`) and how its trainable parts train.

`model.dtype=auto` is bfloat16 where the hardware multiplies bf16 matrices natively (any CUDA device that
supports bf16, and CPUs with bf16 matrix units: Intel AMX-BF16 or AVX512-BF16, read from /proc/cpuinfo's
flags, because torch's `get_cpu_capability()` says only "AVX512" on such CPUs) and float32 elsewhere, where
bf16 would be emulated and slower than fp32. The choice and its reason are recorded in results.json.

Training in a low-precision run (bf16/fp16 weights) uses mixed precision: every trainable parameter is held in
float32 (the master weights, and so AdamW's moments are float32 too) while the forward and backward run under
`torch.autocast` in the run's dtype. Pure-bf16 AdamW loses small updates to rounding (bf16 has 8 bits of
mantissa: an update below ~1/256 of a weight vanishes; at lr 5e-5 only ~21% of the weights changed per step,
measured on SmolLM2). After training the kept weights are cast back to the run's dtype, so the saved model
and the stage cache hold what the rest of the run computes with. float16 adds loss scaling (GradScaler).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 matrix / dot-product units


@lru_cache(maxsize=1)
def cpu_bf16_units() -> str | None:
    """The first bf16 matrix-unit flag this CPU reports, or None (also where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break  # every core of a machine reports the same flags
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(the dtype a run uses, why): `auto` resolved from the hardware, any other name as given."""
    if dtype != "auto":
        return dtype, "given"
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {torch.cuda.get_device_name(torch.device(device))} supports bf16"
        return "float32", "auto: this CUDA device has no bf16"
    unit = cpu_bf16_units()
    if unit:
        return "bfloat16", f"auto: CPU has {unit}"
    return "float32", "auto: CPU without bf16 matrix units (amx_bf16/avx512_bf16): bf16 would be emulated"


def torch_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    return DTYPES[resolve_dtype(dtype, device)[0]]


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter (float32 if none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` for a low-precision run; nothing for float32 (so fp32 runs are bit-identical)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class MasterWeights:
    """Hold `params` in float32 while they train; `release()` casts them back to the dtypes they came in.

    The parameters are changed in place (`p.data`), so modules, optimizers and state dicts keep referring to
    the same objects; a gradient follows its parameter's dtype, so AdamW's state is float32 too."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.dtypes = [p.dtype for p in params]
        for p in params:
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()

    def release(self) -> None:
        for p, dt in zip(self.params, self.dtypes):
            if p.dtype != dt:
                p.data = p.data.to(dt)
                p.grad = None
