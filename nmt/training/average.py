"""Checkpoint averaging: the element-wise mean of the model weights of several checkpoints.

Float tensors are summed in (at least) fp32 and cast back to their dtype in the last checkpoint;
integer and bool tensors (counters, masks) are taken from the last checkpoint. An averaged checkpoint
keeps the last input's config and vocabulary fields but none of its training state (optimizer,
schedule, RNG): it is for translation, not for resuming.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from nmt.errors import NmtError
from nmt.training.checkpoint import load_checkpoint, save_checkpoint

PERIODIC = re.compile(r"ckpt_step(\d+)\.pt")  # the trainer's periodic checkpoints: ckpt_step{step:08d}.pt
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "train_state", "rng")
FORMAT_MARKERS = ("format", "format_version", "nmt_version")  # rewritten by save_checkpoint


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The averaged 'model' state dict of the checkpoints at `paths` (loaded one at a time)."""
    return _average(paths)[0]


def average_run(run_dir: Path, last: int) -> list[Path]:
    """The last `last` periodic checkpoints (`ckpt_step*.pt`) of `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if last < 1:
        raise NmtError(f"--last {last}: must be at least 1")
    if not run_dir.is_dir():
        raise NmtError(f"{run_dir}: run directory not found")
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := PERIODIC.fullmatch(p.name)))
    if len(found) < last:
        raise NmtError(f"{run_dir}: asked for the last {last} periodic checkpoints but found {len(found)} "
                       "(train.keep_last sets how many the trainer keeps)")
    return [path for _, path in found[-last:]]


def write_average(paths: list[Path], out: Path) -> Path:
    """Average the checkpoints at `paths` into a new checkpoint at `out` (written atomically).

    `out` may replace an existing file unless it is one of the inputs. The result records the input
    file names under 'averaged_from'.
    """
    paths, out = [Path(p) for p in paths], Path(out)
    if any(out.resolve() == p.resolve() for p in paths):
        raise NmtError(f"{out}: the output would overwrite one of the checkpoints being averaged")
    model, last = _average(paths)
    payload = {key: value for key, value in last.items() if key not in TRAINING_STATE + FORMAT_MARKERS}
    payload.update(model=model, averaged_from=[p.name for p in paths])
    try:
        save_checkpoint(out, payload)
    except OSError as e:
        raise NmtError(f"{out}: cannot write the averaged checkpoint ({e.strerror})") from None
    return out


def _average(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(averaged model state dict, the last checkpoint without its 'model')."""
    if not paths:
        raise NmtError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    first: tuple[Path, dict[str, torch.Size], Any] | None = None  # path, shapes, vocabulary
    last: dict[str, Any] = {}
    for path in paths:
        last = load_checkpoint(path)
        model = last.pop("model", None)
        if not isinstance(model, dict):
            raise NmtError(f"{path}: checkpoint has no model weights")
        if first is None:
            first = (path, {name: t.shape for name, t in model.items()}, last.get("vocab"))
        else:
            _check_compatible(path, model, last.get("vocab"), *first)
        for name, tensor in model.items():
            dtypes[name] = tensor.dtype
            if not tensor.is_floating_point():
                total[name] = tensor
            elif name not in total:  # a copy: tied weights share storage and must not be summed twice
                total[name] = tensor.to(torch.promote_types(tensor.dtype, torch.float32), copy=True)
            else:
                total[name] += tensor
    averaged = {name: (t / len(paths)).to(dtypes[name]) if dtypes[name].is_floating_point else t
                for name, t in total.items()}
    return averaged, last


def _check_compatible(path: Path, model: dict[str, torch.Tensor], vocab: Any,
                      first_path: Path, first_shapes: dict[str, torch.Size], first_vocab: Any) -> None:
    """NmtError naming `path` unless its parameters (names, shapes) and vocabulary match the first's."""
    missing, unexpected = sorted(set(first_shapes) - set(model)), sorted(set(model) - set(first_shapes))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else [])
        raise NmtError(f"{path}: parameters differ from {first_path} ({'; '.join(parts)})")
    for name, tensor in model.items():
        if tensor.shape != first_shapes[name]:
            raise NmtError(f"{path}: parameter {name} has shape {tuple(tensor.shape)}, "
                           f"{tuple(first_shapes[name])} in {first_path}")
    if vocab != first_vocab:
        raise NmtError(f"{path}: its vocabulary differs from {first_path}'s (only checkpoints of one "
                       "vocabulary can be averaged)")
