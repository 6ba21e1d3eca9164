"""`--device auto|cpu|cuda[:N]` -> torch.device, with a one-line error when the choice cannot work."""

from __future__ import annotations

import torch

from nmt.errors import NmtError


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' = the first CUDA GPU if there is one, else the CPU; 'cpu'; 'cuda' or 'cuda:N'."""
    device = _parse_device(name)
    if device.type == "cuda":
        configure_cuda()
    return device


def configure_cuda() -> None:
    """Leave cuDNN out of scaled-dot-product attention: it builds an execution plan for every new
    sequence length, and token-based batches and step-by-step decoding bring a new length every few
    steps (on an H100 the first 50 bf16 training updates took 15 s instead of 1 s). Flash and
    memory-efficient attention need no such plans."""
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def _parse_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    choice = str(name).strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    kind, _, index = choice.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise NmtError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise NmtError(f"--device {name}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise NmtError(f"--device {name}: this machine has {count} CUDA device(s), numbered from 0")
    return torch.device(choice)
