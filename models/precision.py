"""The float type a model computes in: fp16 autocast on CUDA, bf16 autocast on CPUs built for it.

On the CPU, bf16 pays only where the hardware computes it natively (AVX512-BF16 or AMX tiles:
oneDNN then runs convolutions and matmuls in bf16 at up to twice the fp32 rate); elsewhere bf16
is emulated and slower than fp32, so ``auto`` means fp32 there. Autocast keeps the weights, the
optimiser state and everything outside the autocast region (losses, metrics) in fp32.
"""

from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def cpu_has_native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` (None: plain fp32).

    CUDA: always fp16 (``precision`` is a CPU setting). CPU: bf16 when asked for, or with
    ``auto`` when the CPU has native bf16; fp32 otherwise.
    """
    if device.type == "cuda":
        return torch.float16
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How reports name it: "fp16 autocast", "bf16 autocast" or "fp32"."""
    return {torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}.get(dtype, "fp32")
