"""Minimal streaming safetensors reader/writer (bf16 included) without torch.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {...}} padded with spaces to a multiple of 8, then the raw
little-endian tensor bytes. Our own writer lets an exporter write one tensor at a time (the
header only needs shapes and dtypes, known up front from the mapping table), and the reader maps
the file so a 10 GB checkpoint is never read whole. Files are interchangeable with the
`safetensors` package (tests check both directions).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_code(dtype) -> str:
  return _NAMES[np.dtype(dtype)]


class SafetensorsFile:
  """Read-only view of one .safetensors file; tensors are memory-mapped on demand."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
    self.header: dict[str, dict[str, Any]] = header
    self._base = 8 + n
    self._map = None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self.header[name]["dtype"]]

  def raw_bytes(self, name: str) -> bytes:
    start, end = self.header[name]["data_offsets"]
    with open(self.path, "rb") as f:
      f.seek(self._base + start)
      return f.read(end - start)

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy array backed by the mapped file."""
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = self.header[name]["data_offsets"]
    buf = self._map[self._base + start:self._base + end]
    return buf.view(self.dtype(name)).reshape(self.shape(name))


def write_file(path: str, specs: Iterable[tuple[str, tuple[int, ...], Any]],
               produce: Callable[[str], np.ndarray],
               metadata: Mapping[str, str] | None = None) -> int:
  """Writes tensors described by (name, shape, dtype), calling `produce(name)` one at a time.

  Returns the number of tensor bytes written. Tensors are stored in the given order.
  """
  specs = list(specs)
  header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
  offset = 0
  for name, shape, dtype in specs:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_code(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in specs:
      arr = np.ascontiguousarray(produce(name))
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: produced {arr.shape} {arr.dtype}, "
                         f"header says {tuple(shape)} {np.dtype(dtype)}")
      f.write(arr.reshape(-1).view(np.uint8).data)  # little-endian hosts only (x86, ARM)
  os.replace(tmp, path)
  return offset
