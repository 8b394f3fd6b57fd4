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

from moss_jax.errors import UserError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_code(dtype) -> str:
  return _NAMES[np.dtype(dtype)]


# The safetensors package refuses headers above 100 MB; a larger length is a corrupt file, and
# reading it would first try to allocate that much.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(UserError, ValueError):
  """A .safetensors file that is truncated or whose header is inconsistent; names file and tensor."""


class SafetensorsFile:
  """Read-only view of one .safetensors file; tensors are memory-mapped on demand.

  The header is checked against the file when it is opened (length, JSON, dtype, shape, offsets
  inside the file, byte counts, no overlap), so a truncated or corrupt file fails here with the
  file and tensor named, instead of later as a reshape error or as header bytes read as weights.
  """

  def __init__(self, path: str):
    self.path = str(path)
    with open(self.path, "rb") as f:
      f.seek(0, os.SEEK_END)
      self.file_size = f.tell()
      f.seek(0)
      if self.file_size < 8:
        raise self._error(f"truncated: {self.file_size} bytes, not even the 8-byte header length")
      (n,) = struct.unpack("<Q", f.read(8))
      if n > min(MAX_HEADER_BYTES, self.file_size - 8):
        raise self._error(f"corrupt header length {n} (the file has {self.file_size} bytes; "
                          "truncated or not a safetensors file)")
      raw = f.read(n)
    try:
      header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
      raise self._error(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise self._error(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
      raise self._error("__metadata__ is not an object")
    self.metadata: dict[str, str] = metadata
    self.header: dict[str, dict[str, Any]] = header
    self._base = 8 + n
    self._check_entries()
    self._map = None

  def _error(self, msg: str, name: str | None = None) -> SafetensorsError:
    where = f"{self.path}: tensor {name!r}: " if name is not None else f"{self.path}: "
    return SafetensorsError(where + msg)

  def _check_entries(self) -> None:
    data_bytes = self.file_size - self._base
    spans = []
    for name, info in self.header.items():
      if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise self._error("entry lacks dtype, shape or data_offsets", name)
      code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
      if code not in _DTYPES:
        extra = " (FP8 checkpoints carry scales this reader does not apply)" if str(
            code).startswith("F8") else ""
        raise self._error(f"unsupported dtype {code!r}{extra}; supported: "
                          f"{', '.join(_DTYPES)}", name)
      if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise self._error(f"bad shape {shape!r}", name)
      if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise self._error(f"bad data_offsets {offsets!r}", name)
      start, end = offsets
      if start < 0 or end < start:
        raise self._error(f"bad data_offsets [{start}, {end}] (negative or reversed)", name)
      want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[code].itemsize
      if end - start != want:
        raise self._error(f"data_offsets [{start}, {end}] hold {end - start} bytes, but "
                          f"{code} {tuple(shape)} needs {want}", name)
      if end > data_bytes:
        raise self._error(f"file is truncated: the tensor ends at data byte {end}, the file "
                          f"has {data_bytes} bytes of data ({self.file_size} in all)", name)
      spans.append((start, end, name))
    reach, owner = 0, None  # the furthest end so far and its tensor
    for start, end, name in sorted(spans):
      if start < reach and end > start:  # empty tensors overlap nothing
        raise self._error(f"data_offsets [{start}, {end}] overlap those of tensor {owner[2]!r} "
                          f"[{owner[0]}, {owner[1]}]", name)
      if end > reach:
        reach, owner = end, (start, end, name)

  def keys(self) -> list[str]:
    return list(self.header)

  def _info(self, name: str) -> dict[str, Any]:
    try:
      return self.header[name]
    except KeyError:
      raise self._error("no such tensor in this file", name) from None

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info(name)["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self._info(name)["dtype"]]

  def raw_bytes(self, name: str) -> bytes:
    start, end = self._info(name)["data_offsets"]
    with open(self.path, "rb") as f:
      f.seek(self._base + start)
      data = f.read(end - start)
    if len(data) != end - start:
      raise self._error(f"file shrank since it was opened: read {len(data)} of {end - start} "
                        "bytes", name)
    return data

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy array backed by the mapped file."""
    start, end = self._info(name)["data_offsets"]
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    buf = self._map[self._base + start:self._base + end]
    if buf.size != end - start:
      raise self._error(f"file shrank since it was opened: {buf.size} of {end - start} bytes "
                        "left", name)
    return buf.view(self.dtype(name)).reshape(self.shape(name))


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


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
