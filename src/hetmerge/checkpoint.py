"""Checkpoints: safetensors for tensors, JSON metadata in the same file's header, never pickle.

One file per model keeps the write atomic; the metadata says how to rebuild the module, so loading
needs no code from the writer. Every file carries a SHA-256 of its metadata and of each tensor, checked on
load, so a flipped bit or a damaged copy fails loudly (naming the tensor) instead of giving wrong results.
"""

from __future__ import annotations

import hashlib
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
CHECKSUMS = "hetmerge.sha256"  # header key: {"metadata": digest, "tensors": {name: digest}}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it claims to hold."""


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's dtype, shape and raw bytes (dtype and shape too: a header edit is caught)."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _checksums(tensors: Mapping[str, torch.Tensor], metadata: str) -> str:
    return json.dumps(
        {
            "metadata": hashlib.sha256(metadata.encode()).hexdigest(),
            "tensors": {name: _digest(tensors[name]) for name in sorted(tensors)},
        },
        sort_keys=True,
    )


def verify_checksums(path: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> None:
    """Raise CheckpointError unless the metadata and every tensor are byte for byte what `save_tensors` wrote."""
    corrupt = "the file is corrupt; delete it and rerun the job that made it"
    if CHECKSUMS not in header:
        raise CheckpointError(
            f"{path} has no checksums: it was written by a hetmerge version that did not checksum its files, "
            "by another program, or its header is damaged; delete it and rerun the job that made it"
        )
    try:
        stored = json.loads(header[CHECKSUMS])
        metadata, digests = stored["metadata"], dict(stored["tensors"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable checksums ({err!r}); {corrupt}") from err
    if hashlib.sha256(header.get("hetmerge", "").encode()).hexdigest() != metadata:
        raise CheckpointError(f"{path}: the metadata does not match its checksum; {corrupt}")
    unlisted = sorted(set(tensors) ^ set(digests))
    if unlisted:
        where = "not in the checksums" if unlisted[0] in tensors else "missing from the file"
        raise CheckpointError(f"{path}: tensor {unlisted[0]!r} is {where}; {corrupt}")
    for name in sorted(tensors):
        if _digest(tensors[name]) != digests[name]:
            raise CheckpointError(f"{path}: tensor {name!r} does not match its checksum; {corrupt}")


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors plus JSON metadata and their checksums atomically."""
    metadata = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"hetmerge": metadata, CHECKSUMS: _checksums(plain, metadata)}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata, verified against their checksums; any defect is reported with the file's name."""
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
    verify_checksums(path, tensors, header)
    try:
        meta = json.loads(header["hetmerge"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, meta


def _check_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Compare names and shapes only, so `module` may live on the meta device (nothing allocated)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: the model its metadata describes does not match its tensors "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for key in sorted(state):
        if state[key].shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint {path}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"the model its metadata describes needs {tuple(expected[key].shape)}"
            )


def save_model(model: MultiTaskNet | MergedModel, path: str | os.PathLike[str], info: Mapping[str, Any]) -> None:
    """Save a base or merged model with free-form `info` (training config, provenance...)."""
    if isinstance(model, MergedModel):
        meta = {"kind": "merged", "model": model.describe(), "info": dict(info)}
    else:
        meta = {"kind": "model", "model": model.describe(), "info": dict(info)}
    save_tensors(path, model.state_dict(), meta)


def _build(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Path) -> MultiTaskNet | MergedModel:
    """The module the metadata describes, freshly initialised (on the meta device inside `torch.device("meta")`)."""
    try:
        if meta["kind"] == "model":
            return build_from_description(meta["model"])
        if meta["kind"] == "merged":
            desc = meta["model"]
            trunk = None if desc["trunk"] is None else build_from_description(desc["trunk"])
            branches = [build_from_description(b) for b in desc["branches"]]
            maps = [state[f"unmerge.{i}.weight"] if has else None for i, has in enumerate(desc["unmerge"])]
            return MergedModel(trunk, branches, desc["cut"], maps)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model description: {err}") from err
    raise CheckpointError(f"checkpoint {path} has unknown kind {meta['kind']!r}")


def load_model(path: str | os.PathLike[str]) -> tuple[MultiTaskNet | MergedModel, dict[str, Any]]:
    """Load whatever `save_model` wrote; returns the module (in eval mode) and its metadata."""
    state, meta = load_tensors(path)
    return model_from_tensors(state, meta, path), meta


def model_from_tensors(
    state: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: str | os.PathLike[str]
) -> MultiTaskNet | MergedModel:
    """The module (in eval mode) of what `load_tensors` read from a file `save_model` wrote (`path` names it in
    errors), for callers that have read the file already.

    The description is first built on the meta device and checked against the file's tensors, so metadata
    that claims a huge model is refused before anything that size is allocated.
    """
    path = Path(path)
    with torch.device("meta"):
        _check_state(_build(meta, state, path), state, path)
    model = _build(meta, state, path)
    model.load_state_dict(state)
    return model.eval()


def load_base_model(path: str | os.PathLike[str]) -> tuple[MultiTaskNet, dict[str, Any]]:
    """Load a single trained network (what merge methods take as input)."""
    model, meta = load_model(path)
    if not isinstance(model, MultiTaskNet):
        raise CheckpointError(f"checkpoint {path} holds a merged model, not a single network")
    return model, meta
