"""DeviceIndex: an int that also carries its value in a one-element int64 device tensor.

The CUDA-graph runner passes `current_start` as one so that one captured graph serves every block;
which code reads the int and which the tensor: longlive_triton/runtime/graphs.py, module docstring.
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
