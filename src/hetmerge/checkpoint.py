"""Checkpoints: safetensors for tensors, JSON metadata in the same file's header, never pickle.

One file per model keeps the write atomic; the metadata says how to rebuild the module, so loading
needs no code from the writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hetmerge.atomic import atomic_path
from hetmerge.merged import MergedModel
from hetmerge.models import MultiTaskNet, build_from_description

FORMAT = "hetmerge/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it claims to hold."""


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors plus JSON metadata atomically."""
    header = {"hetmerge": json.dumps({"format": FORMAT, **meta}, sort_keys=True)}
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata; any defect is reported with the file's name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises several error types for truncated/garbled files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {err}") from err
    if "hetmerge" not in header:
        raise CheckpointError(f"checkpoint {path} has no hetmerge metadata (not written by hetmerge?)")
    try:
        meta = json.loads(header["hetmerge"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, meta


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: {what} does not match its architecture "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint {path}: {what} tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"the architecture needs {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state)


def save_model(model: MultiTaskNet | MergedModel, path: str | os.PathLike[str], info: Mapping[str, Any]) -> None:
    """Save a base or merged model with free-form `info` (training config, provenance...)."""
    if isinstance(model, MergedModel):
        meta = {"kind": "merged", "model": model.describe(), "info": dict(info)}
    else:
        meta = {"kind": "model", "model": model.describe(), "info": dict(info)}
    save_tensors(path, model.state_dict(), meta)


def load_model(path: str | os.PathLike[str]) -> tuple[MultiTaskNet | MergedModel, dict[str, Any]]:
    """Load whatever `save_model` wrote; returns the module (in eval mode) and its metadata."""
    path = Path(path)
    state, meta = load_tensors(path)
    try:
        if meta["kind"] == "model":
            model: MultiTaskNet | MergedModel = build_from_description(meta["model"])
        elif meta["kind"] == "merged":
            desc = meta["model"]
            trunk = None if desc["trunk"] is None else build_from_description(desc["trunk"])
            branches = [build_from_description(b) for b in desc["branches"]]
            maps = [state[f"unmerge.{i}.weight"] if has else None for i, has in enumerate(desc["unmerge"])]
            model = MergedModel(trunk, branches, desc["cut"], maps)
        else:
            raise CheckpointError(f"checkpoint {path} has unknown kind {meta['kind']!r}")
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} has an invalid model description: {err}") from err
    _load_into(model, state, path, "model")
    return model.eval(), meta


def load_base_model(path: str | os.PathLike[str]) -> tuple[MultiTaskNet, dict[str, Any]]:
    """Load a single trained network (what merge methods take as input)."""
    model, meta = load_model(path)
    if not isinstance(model, MultiTaskNet):
        raise CheckpointError(f"checkpoint {path} holds a merged model, not a single network")
    return model, meta
