"""DeviceIndex: an int that also lives on the GPU, so one captured CUDA graph serves every block.

LongLive passes `current_start` (the first new token's index) as a Python int through the model to
every self-attention layer. The host needs it as an int (the stock code's arithmetic, our host-side
window bookkeeping), but a kernel launch captured in a CUDA graph would freeze an int argument. A
DeviceIndex is that int, carrying a one-element int64 device tensor with the same value: the patched
layers hand the tensor to their kernels, so a graph replays with whatever the tensor holds when the
graph runner has refilled it for the next call. Everything else sees a plain int.
"""
from __future__ import annotations

import torch


class DeviceIndex(int):
    tensor: torch.Tensor

    def __new__(cls, value: int, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.numel() != 1:
            raise TypeError("DeviceIndex needs an int64 tensor of one element")
        self = super().__new__(cls, value)
        self.tensor = tensor
        return self
