"""Nested training state (optimizer, scheduler, RNG, scaler ``state_dict``s) as JSON + safetensors, never a pickle.

``save_state(obj, folder, name)`` writes ``name.json`` (the structure: dicts with any JSON-able keys, lists, tuples,
numbers including non-finite floats, strings, booleans, ``None``) and, when ``obj`` holds tensors or numpy arrays,
``name.safetensors`` (their data); ``load_state(folder, name)`` rebuilds the object. Anything else (an arbitrary
Python object) is a ``TypeError``: these files are data, so loading them runs no code, unlike ``torch.save`` files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

FORMAT = "haf-state-1"


def _encode(x: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    import numpy as np

    if isinstance(x, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = x.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(x, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy())
        return {"ndarray": key, "dtype": x.dtype.str, "shape": list(x.shape)}
    if isinstance(x, np.generic):
        x = x.item()
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"float": repr(x)}
    if isinstance(x, dict):
        return {"dict": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(x)]
    raise TypeError(f"save_state: {where} is a {type(x).__name__}, which cannot be stored without pickle")


def _decode(x: Any, tensors: dict[str, torch.Tensor], map_location: str | torch.device) -> Any:
    import numpy as np

    if isinstance(x, list):
        return [_decode(v, tensors, map_location) for v in x]
    if not isinstance(x, dict):
        return x
    if "tensor" in x:
        return tensors[x["tensor"]].to(map_location)
    if "ndarray" in x:
        data = tensors[x["ndarray"]].numpy().tobytes()
        return np.frombuffer(data, dtype=np.dtype(x["dtype"])).reshape(x["shape"]).copy()
    if "float" in x:
        return float(x["float"])
    if "tuple" in x:
        return tuple(_decode(v, tensors, map_location) for v in x["tuple"])
    if "dict" in x:
        return {_decode(k, tensors, map_location): _decode(v, tensors, map_location) for k, v in x["dict"]}
    raise ValueError(f"load_state: unknown entry {x!r}")


def save_state(obj: Any, folder: str | Path, name: str) -> list[Path]:
    """Write ``obj`` as ``folder/name.json`` (+ ``folder/name.safetensors`` if it holds arrays); returns the paths.

    ``TypeError`` naming the first part of ``obj`` that is not data (tensors, arrays, containers, scalars)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    value = _encode(obj, tensors, name)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.json"]
    paths[0].write_text(json.dumps({"format": FORMAT, "value": value}) + "\n", encoding="utf-8")
    if tensors:
        paths.append(folder / f"{name}.safetensors")
        save_file(tensors, str(paths[1]))
    return paths


def has_state(folder: str | Path, name: str) -> bool:
    """Whether ``save_state`` wrote ``name`` into ``folder``."""
    return (Path(folder) / f"{name}.json").is_file()


def load_state(folder: str | Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    """The object ``save_state`` wrote as ``name`` in ``folder``, its tensors on ``map_location``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    record = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{folder / (name + '.json')}: not a {FORMAT} file")
    data = folder / f"{name}.safetensors"
    tensors = load_file(str(data)) if data.is_file() else {}
    return _decode(record["value"], tensors, map_location)
