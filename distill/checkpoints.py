"""Reading a distill-train checkpoint, whatever wrote it: one place for every reader (resume,
distill-eval, distill-export).

A checkpoint is a Lightning .ckpt file (strategies auto / ddp) or a DeepSpeed ZeRO checkpoint
directory (strategy deepspeed_*: one shard per rank under <dir>/checkpoint/, written by Lightning's
DeepSpeedStrategy). `read_checkpoint` turns either into the same dict: the Lightning checkpoint
keys, with "state_dict" holding full fp32 `student.*` tensors (ZeRO shards consolidated).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

# What DeepSpeed keeps in its model-states file beside Lightning's own checkpoint keys.
_DEEPSPEED_KEYS = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps",
                   "global_steps", "dp_world_size", "mp_world_size", "buffer_names", "param_shapes",
                   "frozen_param_shapes", "frozen_param_fragments", "shared_params", "ds_config", "ds_version")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupted, or not written by distill-train."""


def is_zero_checkpoint(path: str | Path) -> bool:
    """True for a DeepSpeed checkpoint directory (it names its latest tag in a file `latest`)."""
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def _load(file: Path, what: str) -> dict[str, Any]:
    """torch.load with every way a file can be broken reported as one CheckpointError line."""
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{what} {file} is truncated or corrupted ({reason}); use an earlier checkpoint "
                              "(checkpoints/stage<i>-<name>.ckpt) or start without ckpt_path") from None


def _read_zero(directory: Path, weights: bool) -> dict[str, Any]:
    """Lightning's checkpoint keys from the rank-0 model-states file, plus (weights=True) the fp32
    weights gathered from every rank's optimizer shard (frozen parameters from the model states)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files

    tag = (directory / "latest").read_text().strip()
    model_files = get_model_state_files(str(directory / tag))
    if not model_files:
        raise CheckpointError(f"ZeRO checkpoint {directory} has no model-states file under {tag}/")
    client = _load(Path(sorted(model_files)[0]), "ZeRO model-states file")
    checkpoint = {k: v for k, v in client.items() if k not in _DEEPSPEED_KEYS}
    if not weights:
        return {**checkpoint, "state_dict": {}}
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a line per shard
            gathered = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError, FileNotFoundError) as err:
        raise CheckpointError(f"ZeRO checkpoint {directory} cannot be consolidated ({err}); "
                              "a shard is missing or broken") from None
    # Lightning wraps the module; DeepSpeed saw its parameters under "_forward_module."
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v.float() for k, v in gathered.items()}
    return checkpoint


def read_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """A distill-train checkpoint (file or ZeRO directory) as one dict with fp32 `state_dict`.
    weights=False skips gathering a ZeRO directory's shards (its state_dict is then empty): enough
    to read the `distill` record of a checkpoint that a DeepSpeed strategy will restore itself.

    Raises CheckpointError (a ValueError: one line on the command line) when the path is missing,
    the file is truncated or corrupted, or it was not written by distill-train.
    """
    path = Path(path)
    if is_zero_checkpoint(path):
        checkpoint = _read_zero(path, weights)
    elif path.is_file():
        checkpoint = _load(path, "checkpoint")
    else:
        raise CheckpointError(f"no checkpoint at {path}: give a .ckpt file or a DeepSpeed checkpoint "
                              "directory written by distill-train")
    if not isinstance(checkpoint, dict) or "distill" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a distill-train checkpoint (it has no 'distill' record)")
    return checkpoint
