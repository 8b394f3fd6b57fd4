"""The safetensors reader refuses damaged files with one error naming the file and the tensor.

Each test crafts a file the way a failed copy, a bad writer or an FP8 release would leave it, and
checks the message a user sees (never a reshape error, a MemoryError or header bytes as weights).
"""

import json
import struct

import numpy as np
import pytest

from moss_jax.errors import UserError
from moss_jax.hf import io
from moss_jax.hf.safetensors_file import SafetensorsError, SafetensorsFile, write_file


def _good(tmp_path, name="model.safetensors"):
  """A valid two-tensor file written by our writer; returns its path."""
  path = str(tmp_path / name)
  tensors = {"a.weight": np.arange(64 * 128, dtype=np.float32).reshape(64, 128),
             "b.bias": np.ones(16, np.float32)}
  write_file(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__,
             metadata={"format": "pt"})
  return path


def _craft(tmp_path, header: dict, data: bytes = b"", header_len: int | None = None) -> str:
  """A file with this JSON header (and data), optionally lying about the header length."""
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  path = str(tmp_path / "crafted.safetensors")
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
  return path


def _error(path) -> str:
  with pytest.raises(SafetensorsError) as err:
    SafetensorsFile(path)
  assert path in str(err.value)
  return str(err.value)


def test_a_valid_file_reads_back(tmp_path):
  st = SafetensorsFile(_good(tmp_path))
  assert st.get("a.weight")[63, 127] == 64 * 128 - 1 and st.metadata == {"format": "pt"}
  with pytest.raises(SafetensorsError, match="'nope': no such tensor"):
    st.get("nope")


def test_truncated_file_names_the_tensor_cut_off(tmp_path):
  path = _good(tmp_path)
  with open(path, "r+b") as f:
    f.truncate(8 + 200 + 6177)  # a copy that stopped part-way through a.weight
  msg = _error(path)
  assert "tensor 'a.weight'" in msg and "truncated" in msg
  assert issubclass(SafetensorsError, UserError)  # commands print it as one line


def test_file_shorter_than_the_length_field(tmp_path):
  path = str(tmp_path / "tiny.safetensors")
  open(path, "wb").write(b"\x01\x02\x03")
  assert "truncated: 3 bytes" in _error(path)


def test_corrupt_header_length_is_not_a_memory_error(tmp_path):
  path = _craft(tmp_path, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                b"\0" * 4, header_len=2 ** 62)
  assert f"corrupt header length {2 ** 62}" in _error(path)


def test_header_that_is_not_json(tmp_path):
  path = str(tmp_path / "garbage.safetensors")
  open(path, "wb").write(struct.pack("<Q", 16) + b"\xff" * 16 + b"\0" * 8)
  assert "not valid JSON" in _error(path)


def test_unknown_dtype_is_named(tmp_path):
  path = _craft(tmp_path, {"w.weight": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}},
                b"\0" * 4)
  msg = _error(path)
  assert "tensor 'w.weight'" in msg and "unsupported dtype 'F8_E4M3'" in msg and "BF16" in msg


def test_negative_offsets_never_return_header_bytes(tmp_path):
  path = _craft(tmp_path, {"w": {"dtype": "U8", "shape": [8], "data_offsets": [-8, 0]}}, b"\0" * 8)
  msg = _error(path)
  assert "tensor 'w'" in msg and "negative" in msg


def test_overlapping_offsets_name_both_tensors(tmp_path):
  path = _craft(tmp_path, {
      "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
  msg = _error(path)
  assert "tensor 'b'" in msg and "overlap" in msg and "'a'" in msg


def test_byte_count_must_match_dtype_and_shape(tmp_path):
  path = _craft(tmp_path, {"w": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 32]}},
                b"\0" * 32)
  msg = _error(path)
  assert "tensor 'w'" in msg and "hold 32 bytes" in msg and "needs 30" in msg


def test_bad_shape_and_missing_fields(tmp_path):
  path = _craft(tmp_path, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)
  assert "tensor 'w': bad shape [-1]" in _error(path)
  path = _craft(tmp_path, {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)
  assert "tensor 'w': entry lacks" in _error(path)


def test_a_damaged_shard_is_named_by_the_directory_reader(tmp_path):
  path = _good(tmp_path, "model-00002-of-00002.safetensors")
  _good(tmp_path, "model-00001-of-00002.safetensors")
  with open(path, "r+b") as f:
    f.truncate(100)
  (tmp_path / io.INDEX_FILE).write_text(json.dumps({"weight_map": {
      "a.weight": "model-00001-of-00002.safetensors",
      "b.bias": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(SafetensorsError, match="model-00002-of-00002.safetensors"):
    io.CheckpointReader(str(tmp_path))
