"""One path layer for run directories: local paths and object-store URIs (gs://, s3://) alike.

A TPU pod's workers share no disk, so a run directory (config, metrics, TensorBoard, checkpoints,
result, exports) usually lives in a bucket. Everything that reads or writes one goes through
`etils.epath` (the layer Orbax itself uses): on `gs://` it talks to GCS through gcsfs, locally it
is pathlib. Two things differ on an object store and are handled here:

  * `os.path.abspath("gs://b/run")` makes the local path `./gs:/b/run`; `run_path` only makes
    local paths absolute and leaves URIs as they are.
  * Objects cannot be appended to; `AppendFile` keeps the text written so far and rewrites the
    object on every flush (metrics.jsonl, TensorBoard event files). The object stays small
    (a few hundred bytes per log point), so a rewrite per log point costs little.
"""

from __future__ import annotations

import io
import os
import re
import threading

from etils import epath

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str | os.PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local file paths."""
  return bool(_URI.match(os.fspath(path)))


def run_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path for a user-given path: local ones expanded (~) and made absolute, URIs kept."""
  path = os.fspath(path)
  if is_uri(path):
    if path.startswith("file://"):
      return epath.Path(os.path.abspath(path[len("file://"):]))
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


def join(path: str | os.PathLike, *parts: str) -> str:
  """`path / parts` as a string (for APIs that take strings), URIs kept intact."""
  return os.fspath(run_path(path).joinpath(*parts))


def copy_tree(local_dir: str | os.PathLike, target: str | os.PathLike) -> None:
  """Copies a local directory's files into `target` (a local path or a bucket URI)."""
  target = run_path(target)
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    dest = target if rel == "." else target / rel
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        (dest / name).write_bytes(f.read())


class AppendFile:
  """Text appended to a file, on local disks and object stores.

  Locally this is an ordinary append-mode file. On an object store the object is read once
  (so a resumed run keeps the earlier records), the new text is added to an in-memory copy, and
  `flush` rewrites the whole object.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = run_path(path)
    self._lock = threading.Lock()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(self.path):
      self._local = None
      self._buffer = io.StringIO()
      if self.path.exists():
        self._buffer.write(self.path.read_text())
      self._dirty = False
    else:
      self._local = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, text: str) -> None:
    with self._lock:
      if self._local is not None:
        self._local.write(text)
      else:
        self._buffer.write(text)
        self._dirty = True

  def flush(self) -> None:
    with self._lock:
      if self._local is not None:
        self._local.flush()
      elif self._dirty:
        self.path.write_text(self._buffer.getvalue())
        self._dirty = False

  def close(self) -> None:
    self.flush()
    if self._local is not None:
      self._local.close()
      self._local = None


class _BinaryObjectWriter:
  """tensorboardX record writer for object-store URIs: appends bytes, `flush` rewrites the object."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()
    self._dirty = False

  def write(self, data: bytes) -> None:
    self._buffer.write(data)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      self._path.write_bytes(self._buffer.getvalue())
      self._dirty = False

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  """Makes tensorboardX write event files of gs:// / s3:// log directories through epath.

  tensorboardX's own gs:// writer needs google-cloud-storage and its own credentials; routing
  it through epath keeps one storage layer (and one set of credentials) for the whole run.
  """

  def open(self, path: str) -> _BinaryObjectWriter:
    return _BinaryObjectWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_schemes(schemes=("gs", "s3")) -> None:
  """Routes tensorboardX's writes for these URI schemes through epath (idempotent)."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top  # optional writer
  for scheme in schemes:
    record_writer.register_writer_factory(scheme, _EpathWriterFactory())
