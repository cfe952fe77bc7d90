"""Checkpoint containers: the file formats tensors are stored in, one module each.

Every reader returns a :class:`Source` (the table now, each array when asked for); every writer
takes ``(name, array)`` pairs and writes each as it comes, into a temporary file that is renamed
into place only when everything succeeded. What the tensors mean (a layout) is not known here.

- ``safetensors``: single files and sharded ``*.safetensors.index.json`` checkpoints;
- ``npz``: ``np.savez`` archives, never unpickled;
- ``torchzip``: ``torch.save`` files, read only with ``weights_only=True``;
- ``h5``: HDF5 (Keras ``.weights.h5``), read only;
- ``sniff``: which of these a file is, from its bytes.
"""

from vitspec.containers.h5 import open_h5
from vitspec.containers.npz import open_npz, write_npz
from vitspec.containers.safetensors import (
    open_safetensors,
    open_sharded_safetensors,
    read_safetensors,
    write_safetensors,
)
from vitspec.containers.sniff import open_container, sniff_container
from vitspec.containers.source import (
    BFLOAT16,
    FLOAT_KINDS,
    Progress,
    Shape,
    Source,
    fsync,
    is_float,
    nonfinite_summary,
)
from vitspec.containers.torchzip import open_torch_pickle, write_torch_pickle

__all__ = [
    "BFLOAT16",
    "FLOAT_KINDS",
    "Progress",
    "Shape",
    "Source",
    "fsync",
    "is_float",
    "nonfinite_summary",
    "open_container",
    "open_h5",
    "open_npz",
    "open_safetensors",
    "open_sharded_safetensors",
    "open_torch_pickle",
    "read_safetensors",
    "sniff_container",
    "write_npz",
    "write_safetensors",
    "write_torch_pickle",
]
