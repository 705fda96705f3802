"""Where nnU-Net trains and predicts."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Device(StrEnum):
    """The devices a site configures (NnunetResource.device, a SuperNode's `device`)."""

    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"  # cuda when torch sees a GPU, else cpu


def device_for(device: Device | str) -> Any:
    """The torch device: `auto` resolved; any other name (cpu, cuda, or a torch device
    string such as cuda:1) as torch reads it."""
    import torch

    if device == Device.AUTO:
        device = Device.CUDA if torch.cuda.is_available() else Device.CPU
    return torch.device(str(device))
