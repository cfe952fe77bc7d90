"""PyTorch checkpoints (``.pt``/``.pth``/``.bin``): what ``torch.save`` writes, a zip holding a pickle.

Read only with ``torch.load(weights_only=True)``, into memory: a pickle that would build anything but
tensors and plain containers is refused and runs nothing. The state_dict may sit under a key such
as ``state_dict`` or ``model``, and a ``module.`` prefix (DistributedDataParallel) is dropped.
``torch.save`` needs the whole dict, so writing holds one copy of the model.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.containers.source import BFLOAT16, Progress, Shape, Source, fsync
from vitspec.errors import FileFormatError
from vitspec.files import atomic_file

_STATE_DICT_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")


def open_torch_pickle(path: str | os.PathLike[str]) -> Source:
    """A ``torch.save`` file of a state_dict, loaded with ``weights_only=True`` (never runs code)."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise FileFormatError(
            f"{path}: reading .pt/.pth/.bin files needs PyTorch: pip install 'vitspec[torch]'"
        ) from None
    obj = _torch_load(torch, path)
    state = _find_state_dict(obj, path, torch)
    if all(name.startswith("module.") for name in state):  # saved from DistributedDataParallel
        state = {name[len("module.") :]: t for name, t in state.items()}
    entries: dict[str, tuple[Shape, np.dtype]] = {}
    for name, tensor in state.items():
        entries[name] = (tuple(tensor.shape), _torch_numpy_dtype(torch, tensor.dtype, name, path))

    def read(name: str) -> np.ndarray:
        tensor = state[name].detach()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(BFLOAT16)
        return tensor.numpy()

    return Source(path, entries, read, container="torch-pickle")


def _torch_load(torch: Any, path: Path) -> Any:
    # Read into memory, not mapped (mmap=True): a mapped file truncated by another program while a
    # conversion reads it kills the process with SIGBUS. The whole state_dict is held once, which
    # the writers of this container do anyway (docs/reliability.md). The bytes are read first and
    # handed over as a BytesIO: on a damaged file torch's legacy (non-zip) path reads a length the
    # pickle declares, and a real file's read(n) allocates all n bytes up front (tests/fuzz found
    # 55 MB allocated for a 1.6 KB file); a BytesIO never returns more than it holds.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()
        reason = next(
            (line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line),
            detail[0] if detail else "",
        )
        raise FileFormatError(
            f"{path}: refused: the pickle holds more than tensors and would run code when loaded ({reason[:200]}); "
            "nothing was executed. Re-save it as a plain state_dict or as safetensors"
        ) from None
    except Exception as exc:
        # torch.load on damaged bytes raises whatever its parsers meet: RuntimeError, EOFError,
        # zipfile.BadZipFile, and (found by tests/fuzz) IndexError from the unpickler's stack,
        # UnicodeDecodeError, and safetensors' SafetensorError for a file that holds one.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first[:200]}"
        ) from None


def _find_state_dict(obj: Any, path: Path, torch: Any) -> dict[str, Any]:
    def tensors_only(d: Any) -> bool:
        return (
            isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())
        )

    if tensors_only(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if tensors_only(obj.get(key)):
                return dict(obj[key])
    kind = (
        type(obj).__name__
        if not isinstance(obj, dict)
        else f"a dict with keys {', '.join(map(str, list(obj)[:8]))}"
    )
    raise FileFormatError(
        f"{path}: expected a state_dict (a dict of tensors, or one under 'state_dict'/'model'), found {kind}"
    )


def _torch_numpy_dtype(torch: Any, dtype: Any, name: str, path: Path) -> np.dtype:
    table = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
    if dtype in table:
        return np.dtype(table[dtype])
    if dtype == torch.bfloat16 and BFLOAT16 is not None:
        return BFLOAT16
    if dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        return np.dtype(str(dtype).replace("torch.", ""))
    raise FileFormatError(f"{path}: tensor {name} has dtype {dtype}, which vitspec cannot convert")


def write_torch_pickle(
    path: str | os.PathLike[str],
    items: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> None:
    """``torch.save`` of a state_dict. torch.save needs the whole dict, so this holds one copy of the model."""
    import torch

    state: dict[str, Any] = {}
    for name, array in items:
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # a memory-mapped source: torch wants memory of its own
            array = array.copy()
        if BFLOAT16 is not None and array.dtype == BFLOAT16:
            state[name] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(array)
        if progress is not None:
            progress(array.nbytes)
    with atomic_file(path, overwrite=overwrite) as tmp:
        torch.save(state, tmp)
        fsync(tmp)
