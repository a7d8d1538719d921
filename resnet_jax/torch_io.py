"""Reading and writing PyTorch checkpoints: ``.pth`` (through PyTorch, tensors only, never
pickled code) or ``.safetensors`` (through ``safetensors.numpy``, no PyTorch needed), with
torchvision's and timm's key names.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import numpy as np

from resnet_jax.layout import strip_wrappers, to_numpy


def load_torch_checkpoint(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """Read a state_dict from ``.safetensors`` or ``.pth`` as numpy arrays, never running pickled code.

    ``.safetensors`` is read with ``safetensors.numpy`` (no PyTorch needed); anything else with
    ``torch.load(..., weights_only=True)``. Unwraps ``{'state_dict': ...}``/``{'model': ...}`` and
    DataParallel ``module.`` prefixes; half-precision tensors are widened to float32.

    Args:
        path: The checkpoint file; its suffix picks the reader.

    Returns:
        The state_dict, with numpy arrays for tensors.

    Raises:
        ValueError: The file holds pickled objects or no state_dict.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from e
        return {k: to_numpy(v) for k, v in strip_wrappers(load_file(path)).items()}

    import pickle

    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch); .safetensors files need only safetensors."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds more than tensors (a pickled object), and resnet_jax never unpickles "
            "arbitrary code. Re-save it from PyTorch with torch.save(model.state_dict(), path)."
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict (found {type(obj).__name__}).")
    return {k: to_numpy(v) if hasattr(v, "detach") else v for k, v in strip_wrappers(obj).items()}


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: Union[str, os.PathLike]) -> None:
    """Write a state_dict of numpy arrays as ``.safetensors`` (no PyTorch needed) or ``.pth``/``.pt``
    (``torch.save`` of tensors), under a temporary name and then renamed, so a crash never leaves
    a half-written file under ``path``."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1]
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"{path}: the file name must end with .safetensors, .pth or .pt.")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if suffix == ".safetensors":
            try:
                from safetensors.numpy import save_file
            except ImportError as e:
                raise ImportError(f"writing {path} needs safetensors: pip install safetensors") from e
            save_file(dict(state_dict), tmp, metadata={"format": "pt"})
        else:
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"writing {path} needs PyTorch; write .safetensors without it.") from e
            torch.save({k: _to_torch(torch, v) for k, v in state_dict.items()}, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _to_torch(torch: Any, arr: np.ndarray) -> Any:
    if arr.dtype.name == "bfloat16":  # numpy has no bfloat16 torch.from_numpy understands
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, order="C"))  # a writable copy
