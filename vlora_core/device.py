"""The one check of a device name given by a user (`vlora compress --device`, the base model's placement)."""

from __future__ import annotations

import torch

from .errors import VLoRAError


def check_device(name: str | torch.device, what: str = "device", error: type[VLoRAError] = VLoRAError) -> torch.device:
    """``name`` as a torch device vlora can run on here: the CPU, or a CUDA GPU this torch build can see.

    Anything else raises ``error`` naming ``what`` (an option, a setting) and the devices to choose from."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise error(f"{what} {name!r} is not a device name; use cpu or cuda (cuda:N for GPU N).") from None
    if device.type not in ("cpu", "cuda"):
        raise error(f"{what} {name!r}: vlora runs on cpu or cuda (cuda:N for GPU N), not {device.type}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f" (torch {torch.__version__} is built without CUDA)" if torch.version.cuda is None else ""
        raise error(f"{what} {device} was asked for but no CUDA GPU is present{build}; use cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise error(
            f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use cuda:0 .. cuda:N-1."
        )
    return device
