"""Where the heavy work runs: `--device auto` takes a CUDA GPU when torch sees one (then Apple's MPS), else the CPU."""

from __future__ import annotations

import torch

from .errors import ImpqError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ImpqError(None, f"--device {name}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ImpqError(None, f"--device {name}: this torch build sees no CUDA GPU (torch {torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ImpqError(None, f"--device {name}: MPS is not available here")
    return device
