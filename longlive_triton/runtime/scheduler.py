"""LongLive's flow-matching schedule: warped timesteps, flow -> x0, and re-noising.

Same numbers as the stock `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)` after
`set_timesteps(1000, training=True)`: sigma_raw = linspace(1, 0, 1001)[:-1],
sigma = shift * s / (1 + (shift - 1) * s), timesteps = 1000 * sigma (float32).
"""
from __future__ import annotations

import torch


class FlowMatchSchedule:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"timestep shift must be positive, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        sigmas = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = self.sigmas * num_train_timesteps
        self._tables: dict = {}

    def _table(self, name: str, device, dtype) -> torch.Tensor:
        # Copied to each device once: a host-to-device copy per step would wait for the GPU.
        key = (name, torch.device(device), dtype)
        if key not in self._tables:
            self._tables[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._tables[key]

    def denoising_timesteps(self, steps, warp: bool = True) -> torch.Tensor:
        """The per-block step list as float32 timesteps: warped (LongLive's default) or as given."""
        steps = torch.as_tensor(list(steps), dtype=torch.long)
        if steps.numel() == 0:
            raise ValueError("the denoising step list is empty")
        if not warp:
            return steps.to(torch.float32)
        if ((steps < 1) | (steps > self.num_train_timesteps)).any():
            raise ValueError(f"warped denoising steps must lie in [1, {self.num_train_timesteps}], got {steps.tolist()}")
        table = torch.cat((self.timesteps, torch.tensor([0.0])))
        return table[self.num_train_timesteps - steps]

    def _sigma(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sigma of the table entry nearest to each timestep, shaped [N, 1, 1, 1]."""
        timesteps = self._table("timesteps", timestep.device, dtype)
        index = torch.argmin((timesteps.unsqueeze(0) - timestep.to(dtype).unsqueeze(1)).abs(), dim=1)
        return self._table("sigmas", timestep.device, dtype)[index].reshape(-1, 1, 1, 1)

    def flow_to_x0(self, flow: torch.Tensor, xt: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma(t) * v in float64 (the model predicts v = noise - x0); [N, C, H, W]."""
        sigma = self._sigma(timestep, torch.float64)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """(1 - sigma) * x0 + sigma * noise with a float32 sigma, cast to noise's dtype; [N, C, H, W]."""
        sigma = self._sigma(timestep, torch.float32)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)
