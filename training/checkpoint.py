"""Run-directory checkpoints that load without running code.

A checkpoint is two files in the run directory:

- ``model.safetensors``: the model's full state dict (metadata: format, save id, step);
- ``checkpoint.pt``: everything else (step, config as a plain dict, optimiser and scheduler state, RNG state,
  data fingerprints) as tensors, dicts, lists, tuples and primitives only, so that it loads with
  ``torch.load(weights_only=True)``. Nothing a run directory holds is unpickled as arbitrary objects: a
  checkpoint received from someone else is data, never code.

Both are written to ``*.tmp``, fsynced, then committed: ``checkpoint.pt`` is replaced first (the commit point,
carrying the save id of the new weights), then ``model.safetensors``. A kill between the two leaves the new
weights complete in ``model.safetensors.tmp``, which ``load_model_state`` finishes moving; a kill earlier leaves
the previous checkpoint whole. Any failure while writing (a full disk) removes the ``.tmp`` files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.safetensors"
FORMAT = "haf-train-checkpoint/2"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: one line naming the file and what to do."""


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python, torch (CPU, CUDA) and numpy RNG states as tensors / tuples / ints (``weights_only``-loadable)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        keys = np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, dtype=np.uint32)
        np.random.set_state((name, keys, int(pos), int(has_gauss), float(cached)))


# ---------------------------------------------------------------------------------------------- writing
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. some network file systems)
        _fsync(path)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path.tmp``, fsync, then ``os.replace`` (a kill never leaves a torn file); the
    ``.tmp`` is removed on any error (e.g. a full disk). ``obj`` should hold only tensors and plain data, so
    that it loads with ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint copies where needed (tied weights are stored twice), for safetensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach()
        if hasattr(t, "full_tensor"):  # DTensor
            t = t.full_tensor()
        t = t.cpu().contiguous()
        storage = t.untyped_storage()
        if t.numel() and (storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save(run_dir: str | os.PathLike, model_state: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``checkpoint.pt`` (see the module docstring); returns the checkpoint path."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, model_path = run_dir / CHECKPOINT, run_dir / MODEL_FILE
    save_id = secrets.token_hex(8)
    meta = {"format": FORMAT, "save_id": save_id, "step": str(state.get("step", ""))}
    model_tmp, ckpt_tmp = _tmp(model_path), _tmp(ckpt_path)
    try:
        save_file(plain_tensors(model_state), str(model_tmp), metadata=meta)
        _fsync(model_tmp)
        payload = dict(state, format=FORMAT, save_id=save_id, model_file=MODEL_FILE)
        with open(ckpt_tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(ckpt_tmp, ckpt_path)  # commit point: the state now names the new weights' save id
    except BaseException:
        model_tmp.unlink(missing_ok=True)
        ckpt_tmp.unlink(missing_ok=True)
        raise
    os.replace(model_tmp, model_path)
    _fsync_dir(run_dir)
    return ckpt_path


# ---------------------------------------------------------------------------------------------- reading
def _unsafe_reason(exc: BaseException) -> str:
    """What a ``weights_only`` load refused: the global it names (e.g. ``GLOBAL posix.system``), else its first line."""
    import re

    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if m:
        return f"GLOBAL {m.group(1)}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def load_safe(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line ``CheckpointError``\\ s for a missing, truncated,
    corrupted or unsafe (pickled objects beyond tensors and plain data) file. Nothing in it is executed."""
    import pickle

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such {what}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0 or (head == b"PK\x03\x04" and not zipfile.is_zipfile(path)):
        raise CheckpointError(
            f"{path}: truncated or corrupted {what} ({size} bytes; the zip directory is missing, e.g. a copy or "
            "write that was cut short); restore it from a complete copy, or delete it to start fresh"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refusing to load this {what}: it holds pickled Python objects beyond tensors and plain data "
            f"({_unsafe_reason(exc)}), which could run code. Checkpoints written before format 2 "
            "(haf-train with model.safetensors) look like this too: if you trust the file, convert it with "
            f"`python -m training.checkpoint --convert-trusted {path.parent}`; otherwise delete it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'truncated'}"
            "); restore it from a complete copy, or delete it to start fresh"
        ) from None


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """``checkpoint.pt`` (everything but the weights), loaded with ``weights_only=True``."""
    path = Path(path)
    state = load_safe(path)
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a haf-train checkpoint (no step/config); delete it or pick another run")
    if state.get("format") != FORMAT and "model" not in state:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {state.get('format')!r}; this haf-train reads {FORMAT}"
        )
    return state


def _safetensors_id(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("save_id")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_model_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights belonging to ``state`` (a ``load_state`` result): ``model.safetensors`` with the same save id.

    Finishes a save that was killed after its commit point (the new weights are still in ``.tmp``).
    """
    if state.get("format") != FORMAT:  # an old checkpoint that happened to load with weights_only=True
        return state["model"]
    run_dir = Path(run_dir)
    path = run_dir / state.get("model_file", MODEL_FILE)
    want = state["save_id"]
    try:
        for candidate in (path, _tmp(path)):
            if candidate.exists() and _safetensors_id(candidate) == want:
                if candidate != path:  # killed between the two replaces of ``save``: finish it
                    try:
                        os.replace(candidate, path)
                        candidate = path
                    except OSError:  # a read-only run directory: read the weights where they are
                        pass
                return _read_safetensors(candidate)
    except Exception as exc:  # safetensors raises its own error type for truncated / corrupted files
        raise CheckpointError(
            f"{path}: unreadable weights ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "restore the run directory from a complete copy, or delete checkpoint.pt and model.safetensors "
            "to start fresh"
        ) from None
    if not path.exists():
        raise CheckpointError(f"{path}: missing (checkpoint.pt needs it for the weights); restore it from a copy")
    raise CheckpointError(
        f"{path}: does not belong to {run_dir / CHECKPOINT} (save ids differ: the files come from different saves); "
        "restore both from the same copy"
    )


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A whole checkpoint (``load_state`` plus ``"model"``: the weights) from ``RUN_DIR/checkpoint.pt``."""
    path = Path(path)
    state = load_state(path)
    return dict(state, model=load_model_state(path.parent, state))


# ---------------------------------------------------------------------------------------------- data fingerprints
def data_fingerprint(source: str) -> dict[str, Any]:
    """``{"path", "size", "mtime", "sha256"}`` of a data file (a folder: over its files); ``{"path"}`` for a
    name that is not a local path (a hub dataset: nothing to hash)."""
    path = Path(source)
    if not source or not path.exists():
        return {"path": source}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    size, mtime = 0, 0.0
    for p in files:
        st = p.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime)
        if p is not path:
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return {"path": source, "size": size, "mtime": mtime, "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------- old checkpoints
def convert_trusted(run_dir: str | os.PathLike) -> Path:
    """Rewrite an old (pickled, format 1) ``checkpoint.pt`` in this format. Unpickles it: trusted files only."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") == FORMAT:
        return path
    rng = state.get("rng", {})
    if "numpy" in rng and not isinstance(rng["numpy"][1], torch.Tensor):
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = (
            str(name),
            torch.from_numpy(np.asarray(keys).astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        )
    model = state.pop("model")
    return save(run_dir, model, state)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--convert-trusted":
        raise SystemExit(
            "usage: python -m training.checkpoint --convert-trusted RUN_DIR  (unpickles: trusted files only)"
        )
    print(convert_trusted(sys.argv[2]))
