"""Loading `torch.distributed.checkpoint` files without unpickling anything a checkpoint could craft.

Stock DCP reads `.metadata` with `pickle.load` and non-tensor items (the optimizer's param groups) with
`torch.load(weights_only=False)`. A run root is shared storage (S3), and DESIGN.md's rule is that nothing
read from it is unpickled freely: one crafted file would run code in every pod that resumes. The reader
and planner here keep DCP's formats and code paths and only narrow what may be deserialised. Kept apart
from sharded.py so `import amft_lib.trainer` does not pay for importing DCP.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from amft_lib.checkpoint.files import CorruptCheckpointError

# Every global a DCP `.metadata` pickle may name (torch 2.13: Metadata and its parts); plus torch dtypes.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """The standard library's "restricting globals" pattern: a name outside METADATA_GLOBALS (and not a
    torch dtype) is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, reading `.metadata` through `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.path.join(self.path, ".metadata")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as exc:  # UnpicklingError, or a truncated/garbled file
                raise CorruptCheckpointError(f"{path}: refused: {exc}") from None
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except a non-tensor item (the optimizer's param groups: floats, tuples,
    flags) must pass `torch.load(weights_only=True)` before the stock (unrestricted) load reads it."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorruptCheckpointError(
                f"DCP item {read_item.dest_index.fqn} refused by torch.load(weights_only=True): {first}") from None
        value.seek(0)
        super().load_bytes(read_item, value)
