r"""`python -m moss_jax.export`: a training run <-> the reference (Hugging Face) format.

  python -m moss_jax.export --workdir RUN [--step N] --output_dir OUT [--dtype bfloat16|float32]
      [--max_shard_size 5GB] [--tokenizer PATH] [--llm_only] [--overwrite]
      [--peft_adapter_dir DIR]
  python -m moss_jax.export --from_hf DIR --output_dir RUN [--config configs/pretrain.py:4b]

The first form writes the latest complete checkpoint of RUN (or step N) as a directory the
reference PyTorch code, vLLM and SGLang load unchanged: safetensors weights (trainable and frozen
halves merged, no optimizer state), config.json, processor_config.json, generation_config.json,
the run's tokenizer files and the run's resolved config (moss_jax_config.json). `--llm_only`
writes the Qwen3 LLM alone as a plain Qwen3ForCausalLM directory.

A LoRA run (config.model.lora.rank > 0) is exported merged: each adapted kernel is written as
kernel + scale * A @ B (float32, one layer slice at a time, lora.merged_kernel's math) before the
cast to --dtype, with the base model's config (lora.base_model_config), so the directory is a
plain reference model. `--peft_adapter_dir DIR` also writes the adapters alone in PEFT's format.

The second form turns a reference-format directory into a run directory (an Orbax checkpoint at
step 0 plus config.json) that `export --workdir` reads and `train` starts from with
`--config.train.init_from_checkpoint=RUN/checkpoints`.

Why it streams: a checkpoint is read one parameter leaf at a time straight from the Orbax files
(tensorstore, no devices, any mesh or process count that wrote it) and each tensor goes to disk
as soon as it is converted, so host memory peaks near the largest leaf (a layer-stacked kernel),
never the model. Tensors are written leaf by leaf (all layers of one stacked kernel, then the
next); the index file maps every name to its shard, so the order within files is free.

Why a temporary directory: the files are written to a hidden directory beside OUT and renamed to
OUT only when everything is on disk, so a full disk or a killed export never leaves a directory
that looks like a complete model.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import itertools
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from configs import pretrain
from data_pipelines import tokenizers
from moss_jax import checkpoint, cli, hf, optim, paths, progress
from moss_jax.errors import UserError
from moss_jax.hf import config_io, io, mapping
from moss_jax.hf import peft as peft_io
from moss_jax.model import lora

CONFIG_FILE = "config.json"  # a run's resolved config (train.write_config)
RUN_CONFIG_IN_EXPORT = "moss_jax_config.json"
CHECKPOINTS = "checkpoints"
DTYPES = ("bfloat16", "float32", "float16")
# Special ids: (name in config.data.tokenizer / our tokenizers, name in the HF config files).
_ID_NAMES = (("audio_token_id", "audio_token_id"), ("audio_bos_id", "audio_start_id"),
             ("audio_eos_id", "audio_end_id"), ("pad_id", "bos_token_id"),
             ("im_end_id", "eos_token_id"))
# Chunks read at once while reading a leaf: parallel decompression vs transient memory.
_CHUNKS_IN_FLIGHT = 2
# Errors of a write that ran out of room (a full disk, a quota, a file-size limit).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclasses.dataclass
class ExportResult:
  step: int
  output_dir: str
  files: list[str]
  tensor_bytes: int
  seconds: float


# ----------------------------------------------------------------------------- reading a run

def find_step(workdir, step: int | None = None) -> tuple[int, epath.Path]:
  """(step, step directory) of the newest complete checkpoint of a run, or of `step`."""
  ckpt_dir = _absolute(workdir) / CHECKPOINTS
  steps = checkpoint.complete_steps(ckpt_dir)
  if not steps:
    raise UserError(f"{workdir} holds no complete checkpoint (looked in {ckpt_dir})")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f"step {step} is not a complete checkpoint of {workdir}; complete steps: "
                    f"{', '.join(map(str, steps))}")
  return step, ckpt_dir / str(step)


class _UnreadableStep(RuntimeError):
  """A step whose metadata or config cannot be read: the shared fallback sets it aside."""


def open_checkpoint(workdir, step: int | None = None
                    ) -> tuple[int, ml_collections.ConfigDict, "CheckpointParams"]:
  """(step, config, parameters) of `step`; without one, of the newest complete step whose
  metadata and config can be read. An unreadable step is set aside and an older one tried,
  through the fallback train and generate use (`checkpoint.restore_newest`)."""
  _, step_dir = find_step(workdir, step)
  ckpt_dir = step_dir.parent

  def open_step(s: int):
    d = ckpt_dir / str(s)
    try:
      return run_config(d, workdir), CheckpointParams(d)
    except UserError as e:
      if step is not None:  # an explicit step is read or refused, never set aside
        raise
      raise _UnreadableStep(str(e)) from None

  s, (config, params) = checkpoint.restore_newest(ckpt_dir, open_step, step=step)
  return s, config, params


def run_config(step_dir, workdir=None) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with (its `config` item), else the run's config.json."""
  item = epath.Path(step_dir) / checkpoint.CONFIG
  config = None
  if item.exists():
    try:
      config = ocp.JsonCheckpointHandler().restore(item)
    except (OSError, ValueError) as e:
      logging.warning("cannot read the config saved with %s (%s); using the run's %s",
                      step_dir, e, CONFIG_FILE)
  if not config and workdir is not None and (epath.Path(workdir) / CONFIG_FILE).exists():
    config = json.loads((epath.Path(workdir) / CONFIG_FILE).read_text())
  if not config or "model" not in config:
    raise UserError(f"no config with a `model` section beside checkpoint {step_dir}")
  return ml_collections.ConfigDict(config)


class CheckpointParams:
  """The parameters (both halves of the train state) of one checkpoint step, leaf by leaf.

  Reads the Orbax metadata for shapes and dtypes, then each leaf through tensorstore directly
  (the spec Orbax itself reads with), so nothing is placed on a device and the checkpoint may
  come from any mesh or number of processes.
  """

  HALVES = ("params", "frozen")

  def __init__(self, step_dir):
    self.state_dir = epath.Path(step_dir) / checkpoint.STATE
    try:
      meta = ocp.PyTreeCheckpointHandler().metadata(self.state_dir)
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f"cannot read the checkpoint metadata in {self.state_dir}: {e}") from None
    tree = meta.tree
    self.leaves: dict[tuple[str, ...], Any] = {}
    for half in self.HALVES:
      for path, leaf in mapping.flatten_leaves(tree.get(half) or {}).items():
        if path in self.leaves:
          raise UserError(f"parameter {'/'.join(path)} is in both halves of {self.state_dir}")
        self.leaves[path] = leaf
    if not self.leaves:
      raise UserError(f"{self.state_dir} holds no parameters (no params/frozen items)")
    self._use_zarr3 = bool(getattr(meta, "use_zarr3", False))
    self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.state_dir)
    # One context for every leaf, so the OCDBT manifest is read once; a small cache, since each
    # chunk is read exactly once.
    self._context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 64 << 20},
                                "file_io_concurrency": {"limit": 64}})
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="export_read")

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)

  def shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {p: tuple(m.shape) for p, m in self.leaves.items()}

  def nbytes(self, path: tuple[str, ...]) -> int:
    m = self.leaves[path]
    return int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize

  def read(self, path: tuple[str, ...], dtype=None) -> np.ndarray:
    """One whole leaf as a host numpy array, in `dtype` (default: its stored dtype)."""
    return self.start_read(path, dtype)()

  def start_read(self, path: tuple[str, ...], dtype=None, torch_linear: bool = False,
                 into: np.ndarray | None = None):
    """Starts reading a leaf in a background thread; returns a function that waits for it.
    `torch_linear`: a Dense kernel [..., in, out] comes back as torch's [..., out, in]. `into`: a
    flat byte buffer to build the leaf in (reused buffers spare the kernel from zeroing fresh
    pages for every leaf)."""
    future = self._pool.submit(self._read, path, dtype, torch_linear, into)

    def wait() -> np.ndarray:
      try:
        return future.result()
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (tensorstore: ValueError/OSError)
        raise UserError(f"cannot read parameter {'/'.join(path)} from {self.state_dir}: "
                        f"{e}") from None

    return wait

  def _read(self, path: tuple[str, ...], dtype, torch_linear: bool,
            into: np.ndarray | None) -> np.ndarray:
    """Chunk by chunk (the shards Orbax wrote), a few in flight (tensorstore decodes them in
    parallel; the transient memory is those chunks); each is cast by numpy (tensorstore's own
    cast loop is several times slower) and, for a torch-layout kernel, transposed into the
    result in cache-sized tiles, so a float32 leaf exported as bfloat16 is only held in bfloat16
    and no second copy of the leaf is ever made."""
    m = self.leaves[path]
    info = ocp.type_handlers.ParamInfo(
        name=m.name, parent_dir=epath.Path(m.directory or self.state_dir),
        is_ocdbt_checkpoint=self._use_ocdbt, use_zarr3=self._use_zarr3, ts_context=self._context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
    src = ts.open(spec, context=self._context, open=True).result()
    shape = tuple(src.shape)
    if shape != tuple(m.shape):
      raise UserError(f"parameter {'/'.join(path)} in {self.state_dir} has shape "
                      f"{shape}, its metadata says {tuple(m.shape)}")
    dtype = np.dtype(dtype) if dtype is not None else src.dtype.numpy_dtype
    torch_linear = torch_linear and len(shape) >= 2
    out_shape = shape[:-2] + shape[:-3:-1] if torch_linear else shape
    if into is None:
      out = np.empty(out_shape, dtype)
    else:
      out = into[:int(np.prod(out_shape, dtype=np.int64)) * dtype.itemsize].view(dtype)
      out = out.reshape(out_shape)
    chunk = [c or n for c, n in zip(src.chunk_layout.read_chunk.shape or shape, shape)]
    scratch = np.empty(0, dtype)  # one cast chunk of a transposed leaf, reused

    def place(region, value: np.ndarray) -> None:
      nonlocal scratch
      if not torch_linear:
        np.copyto(out[region], value, casting="unsafe")  # cast in place
        return
      if value.dtype != dtype:
        if scratch.size < value.size:
          scratch = np.empty(value.size, dtype)
        cast = scratch[:value.size].reshape(value.shape)
        np.copyto(cast, value, casting="unsafe")
        value = cast
      _transpose_into(out[region[:-2] + (region[-1], region[-2])], value)

    in_flight: collections.deque = collections.deque()
    for start in itertools.product(*[range(0, n, c) for n, c in zip(shape, chunk)]):
      region = tuple(slice(a, min(a + c, n)) for a, c, n in zip(start, chunk, shape))
      in_flight.append((region, src[region].read()))
      if len(in_flight) >= _CHUNKS_IN_FLIGHT:
        region, future = in_flight.popleft()
        place(region, future.result())
    while in_flight:
      region, future = in_flight.popleft()
      place(region, future.result())
    return out


def _transpose_into(out: np.ndarray, x: np.ndarray, tile: int = 128) -> None:
  """out[..., j, i] = x[..., i, j], tile by tile: numpy's plain transposed copy of a large matrix
  misses the cache on nearly every element. Copied as same-size integers (no dtype-specific
  loop: bfloat16 has none)."""
  native = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(x.dtype.itemsize)
  if native is not None:
    out, x = out.view(native), x.view(native)
  rows, cols = x.shape[-2:]
  for i in range(0, rows, tile):
    for j in range(0, cols, tile):
      out[..., j:j + tile, i:i + tile] = np.swapaxes(x[..., i:i + tile, j:j + tile], -1, -2)


class _LeafStream:
  """The leaves of a checkpoint in a fixed order, in the export's dtype (Dense kernels already in
  torch's layout where `torch_linear_paths` says so), built in one reused arena: leaf i at the
  arena's start when i is even, at its end when odd, so the next leaf can be read in the
  background while the current one is written whenever both fit. The arena (the largest leaf)
  is all the memory the leaves take, and reusing it spares the kernel zeroing fresh pages for
  every leaf. (An arena of a quarter of the model let more leaves overlap: ~3% faster on the
  benchmark machine, for 100-150 MB more peak memory.)"""

  def __init__(self, ckpt: CheckpointParams, order: list[tuple[str, ...]], dtype: np.dtype,
               float32_paths=frozenset(), torch_linear_paths=frozenset()):
    self.ckpt = ckpt
    self.order = order
    # LoRA-adapted kernels are read in float32: the adapter is added before the cast.
    self.dtypes = {p: np.dtype(np.float32) if p in float32_paths else dtype for p in order}
    self.torch_linear = torch_linear_paths
    self.sizes = [int(np.prod(ckpt.leaves[p].shape, dtype=np.int64)) * self.dtypes[p].itemsize
                  for p in order]
    self.arena = np.empty(-(-max(self.sizes) // 64) * 64, np.uint8)
    self.current: int | None = None
    self.value: np.ndarray | None = None
    self.pending: dict[int, Any] = {}

  def _offset(self, i: int) -> int:
    """Where leaf i starts in the arena: at 0, or as far back as fits, 64-byte aligned."""
    return 0 if i % 2 == 0 else (self.arena.size - self.sizes[i]) // 64 * 64

  def _start(self, i: int):
    path, offset = self.order[i], self._offset(i)
    return self.ckpt.start_read(path, self.dtypes[path], path in self.torch_linear,
                                into=self.arena[offset:offset + self.sizes[i]])

  def _disjoint(self, i: int, j: int) -> bool:
    (_, first_end), (second_start, _) = sorted(
        (self._offset(k), self._offset(k) + self.sizes[k]) for k in (i, j))
    return first_end <= second_start

  def get(self, path: tuple[str, ...]) -> np.ndarray:
    """The leaf at `path`. Leaves must be asked for in order, and a leaf's arrays are only valid
    until the next one is asked for (its bytes are then reused)."""
    i = self.order.index(path)
    if i != self.current:
      self.value = None
      wait = self.pending.pop(i, None)
      if wait is None:
        self._drain()  # a read out of order: nothing else may be writing into the arena
        wait = self._start(i)
      self.value, self.current = wait(), i
      if i + 1 < len(self.order) and self._disjoint(i, i + 1):
        self.pending[i + 1] = self._start(i + 1)
    return self.value

  def _drain(self) -> None:
    """Waits for the reads in flight (their errors belong to leaves nobody asked for yet)."""
    for wait in self.pending.values():
      try:
        wait()
      except UserError:
        pass
    self.pending.clear()

  def close(self) -> None:
    self._drain()
    self.value, self.current = None, None
    self.ckpt.close()
    self.arena = np.empty(0, np.uint8)


def check_shapes(ckpt: CheckpointParams, model_config, parts=None) -> bool:
  """Raises naming every leaf the config does not expect, lacks or sees mis-shaped; returns
  whether the checkpoint's layers are scanned (stacked). LoRA adapter leaves are left out
  (`adapted_modules` checks them): `model_config` is the base model's."""
  have = {p: s for p, s in ckpt.shapes().items() if p[-1] not in lora.LORA_LEAVES}
  scanned = mapping.tree_is_scanned(_nest(have))
  want = mapping.flax_shapes(model_config, scanned)
  if parts is not None:
    want = {p: s for p, s in want.items() if p[0] in parts}
    have = {p: s for p, s in have.items() if p[0] in parts}
  missing = sorted("/".join(p) for p in set(want) - set(have))
  unknown = sorted("/".join(p) for p in set(have) - set(want))
  wrong = sorted(f"{'/'.join(p)} {have[p]} (config: {want[p]})"
                 for p in set(want) & set(have) if have[p] != want[p])
  problems = [f"{label}: {', '.join(items)}" for label, items in
              (("mis-shaped", wrong), ("missing", missing), ("not in the model", unknown)) if items]
  if problems:
    raise UserError(f"checkpoint {ckpt.state_dir} does not match its config.model: "
                    + "; ".join(problems))
  return scanned


def adapted_modules(ckpt: CheckpointParams, config_model, parts=None
                    ) -> dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]]:
  """{module path: (lora_a path, lora_b path)} of every adapted kernel in `parts` (all by
  default); raises naming adapters without a LoRA spec, without a partner or kernel, or whose
  shapes do not fit their kernel (A [..., in, r], B [..., r, out])."""
  shapes = ckpt.shapes()
  modules = sorted({p[:-1] for p in shapes if p[-1] in lora.LORA_LEAVES
                    and (parts is None or p[0] in parts)})
  if not modules:
    return {}
  spec = lora.spec_from_config(config_model)
  if spec is None:
    raise UserError(f"checkpoint {ckpt.state_dir} has LoRA adapters but its config.model.lora."
                    "rank is 0")
  problems, out = [], {}
  for m in modules:
    a, b, k = m + (lora.LORA_A,), m + (lora.LORA_B,), m + ("kernel",)
    name = "/".join(m)
    if not (a in shapes and b in shapes and k in shapes):
      problems.append(f"{name} needs kernel, lora_a and lora_b")
      continue
    ks, as_, bs = shapes[k], shapes[a], shapes[b]
    if as_ != ks[:-1] + (spec.rank,) or bs != ks[:-2] + (spec.rank, ks[-1]):
      problems.append(f"{name} lora_a {as_} / lora_b {bs} do not fit kernel {ks} at rank "
                      f"{spec.rank}")
      continue
    out[m] = (a, b)
  if problems:
    raise UserError(f"checkpoint {ckpt.state_dir}: LoRA adapters that cannot be merged: "
                    + "; ".join(problems))
  return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    mapping.set_leaf(out, path, value)
  return out


# ----------------------------------------------------------------------------- output directory

def _holds_model(out: epath.Path) -> bool:
  names = {p.name for p in out.iterdir()}
  return bool(names & {"config.json", io.SINGLE_FILE, io.INDEX_FILE}) or any(
      io.SHARD_PATTERN.match(n) for n in names)


def _check_output(out: epath.Path, overwrite: bool) -> None:
  if not out.exists():
    return
  if not out.is_dir():
    raise UserError(f"--output_dir {out} exists and is not a directory")
  if overwrite or not any(out.iterdir()):
    return
  what = "already holds a model" if _holds_model(out) else "is not empty"
  raise UserError(f"--output_dir {out} {what}; pass --overwrite to replace it")


class _Staging:
  """A hidden local directory that becomes `out` on commit (rename, or upload for gs://)."""

  def __init__(self, out: epath.Path):
    self.out = out
    self.local = _is_local(out)
    if self.local:
      out.parent.mkdir(parents=True, exist_ok=True)
      self.path = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
      self.path.mkdir()
    else:
      self.path = epath.Path(tempfile.mkdtemp(prefix="moss_jax_export_"))

  def commit(self) -> None:
    for f in self.path.iterdir():  # written data must be on disk before the rename shows it
      _fsync(f)
    if self.local:
      old = None
      if self.out.exists():
        old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
        self.out.rename(old)
      self.path.rename(self.out)
      if old is not None:
        shutil.rmtree(old)
      return
    # Remote (gs://): no atomic rename; upload everything else first and the top-level
    # config.json last, so a directory without config.json is visibly incomplete.
    if self.out.exists():
      self.out.rmtree()
    files = [os.path.relpath(os.path.join(root, n), self.path)
             for root, _, names in os.walk(self.path) for n in names]
    for rel in sorted(files, key=lambda r: r == "config.json"):
      dest = self.out / rel
      dest.parent.mkdir(parents=True, exist_ok=True)
      with open(self.path / rel, "rb") as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, 64 << 20)  # streamed: a shard may exceed the memory
    shutil.rmtree(self.path)

  def abort(self) -> None:
    shutil.rmtree(self.path, ignore_errors=True)


def _is_local(path) -> bool:
  return not paths.is_uri(path)


def _absolute(path) -> epath.Path:
  """Orbax wants absolute paths; gs:// ones already are."""
  return paths.run_path(path)


def _fsync(path: epath.Path) -> None:
  fd = os.open(os.fspath(path), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_into(out: epath.Path, overwrite: bool, write) -> Any:
  """Runs `write(staging_dir)` and moves the result to `out`; a failed write leaves `out` as it
  was and removes the partial files."""
  _check_output(out, overwrite)
  staging = _Staging(out)
  try:
    result = write(os.fspath(staging.path))
    staging.commit()
  except OSError as e:
    staging.abort()
    if e.errno in _NO_ROOM:
      raise UserError(f"no room to write the export ({os.strerror(e.errno)}: {e.filename or ''})"
                      f"; {out} was left as it was and the partial files were removed") from None
    raise
  except BaseException:
    staging.abort()
    raise
  return result


# ----------------------------------------------------------------------------- export

def token_ids_and_tokenizer(config, tokenizer: str | None = None
                            ) -> tuple[dict[str, int], str | None]:
  """(special ids for the HF config files, tokenizer path to copy) of a run's config.

  The ids come from the run's tokenizer (its special pieces, or the ids set in
  config.data.tokenizer); without a tokenizer, from config.data.tokenizer or the Qwen3 defaults.
  """
  tok_cfg = ml_collections.ConfigDict(config.get("data", {}).get("tokenizer", {}) or {})
  path = tokenizer or tok_cfg.get("path", "")
  if path:
    if not (os.path.exists(path) or not _is_local(epath.Path(path))):
      hint = "" if tokenizer else " (the run's data.tokenizer.path; pass --tokenizer PATH)"
      raise UserError(f"tokenizer {path} not found{hint}")
    tok_cfg.path = path
    try:
      tok = tokenizers.load_tokenizer(tok_cfg)
    except (OSError, ValueError) as e:
      raise UserError(f"cannot load tokenizer {path}: {e}") from None
    ids = {n: getattr(tok, n) for n in tokenizers.SPECIAL_NAMES}
  else:
    logging.warning("the run names no tokenizer (data.tokenizer.path) and --tokenizer was not "
                    "given: the export has no tokenizer files")
    ids = {n: int(tok_cfg[n]) for n in tokenizers.SPECIAL_NAMES
           if tok_cfg.get(n) is not None and int(tok_cfg[n]) >= 0}
  token_ids = dict(config_io.DEFAULT_TOKEN_IDS)
  for ours, theirs in _ID_NAMES:
    if ours in ids:
      token_ids[theirs] = int(ids[ours])
  return token_ids, path or None


def export_run(workdir, output_dir, step: int | None = None, dtype: str = "bfloat16",
               max_shard_size: int | str = "5GB", tokenizer: str | None = None,
               llm_only: bool = False, overwrite: bool = False,
               show_progress: bool | None = None,
               peft_adapter_dir: str | None = None) -> ExportResult:
  """Writes one checkpoint of a training run as a reference-format (or Qwen3) directory.

  Args:
    workdir: the run directory (holds checkpoints/ and config.json).
    output_dir: the directory to create; refused if it holds files, unless `overwrite`.
    step: the checkpoint step (default: the newest complete one).
    dtype: tensor dtype of the files (bfloat16 as released, or float32 for exact weights).
    max_shard_size: above it the weights are split into shards with an index file.
    tokenizer: tokenizer to copy and take special ids from (default: data.tokenizer.path).
    llm_only: write only the Qwen3 LLM + lm_head as a Qwen3ForCausalLM directory.
    overwrite: replace an existing output directory (only once the new one is complete).
    show_progress: a progress bar in bytes (default: when stderr is a terminal).
    peft_adapter_dir: for a LoRA run, also write its adapters in PEFT's format here (the
      weights in OUT are always the merged ones).
  """
  if dtype not in DTYPES:
    raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
  np_dtype = np.dtype(jnp.dtype(dtype))
  try:
    io.parse_size(max_shard_size)
  except ValueError as e:
    raise UserError(f"--max_shard_size: {e}") from None
  out = _absolute(output_dir)
  _check_output(out, overwrite)
  peft_out = _absolute(peft_adapter_dir) if peft_adapter_dir else None
  if peft_out is not None:
    _check_output(peft_out, overwrite)
  step, config, ckpt = open_checkpoint(workdir, step)
  model_config = lora.base_model_config(config.model)  # what the merged weights belong to
  parts = mapping.LLM_PARTS if llm_only else None
  try:
    scanned = check_shapes(ckpt, model_config, parts)
    adapted = adapted_modules(ckpt, config.model, parts)
    if peft_out is not None and not adapted:
      raise UserError(f"--peft_adapter_dir: {workdir} is not a LoRA run (its checkpoint holds "
                      "no adapters)")
    token_ids, tok_path = token_ids_and_tokenizer(config, tokenizer)
  except BaseException:
    ckpt.close()
    raise
  spec = lora.spec_from_config(config.model) if adapted else None
  entries = mapping.entries(model_config, scanned, parts=parts)
  groups = io._group_by_leaf(entries)  # pylint: disable=protected-access
  ordered = [e for group in groups.values() for e in group]  # leaf by leaf (see module doc)
  name = (lambda e: mapping.rename_for_qwen3(e.hf_key)) if llm_only else (lambda e: e.hf_key)
  by_name = {name(e): e for e in ordered}
  total = sum(int(np.prod(e.hf_shape)) for e in ordered) * np_dtype.itemsize
  float32_paths = {m + ("kernel",) for m in adapted}
  torch_linear = {path for path, group in groups.items()
                  if group[0].transform == mapping.LINEAR and path not in float32_paths}
  leaves = _LeafStream(ckpt, list(groups), np_dtype, float32_paths, torch_linear)
  adapter = {}  # the current module's (A, B) in float32: small, read once per stacked kernel

  def produce(hf_name: str) -> np.ndarray:
    e = by_name[hf_name]
    leaf = leaves.get(e.flax_path)
    x = leaf[e.stack_index] if e.stack_index is not None else leaf
    module = e.flax_path[:-1]
    if e.flax_path[-1] == "kernel" and module in adapted:
      if adapter.get("module") != module:
        adapter.clear()
        a_path, b_path = adapted[module]
        adapter.update(module=module, a=ckpt.read(a_path, np.float32),
                       b=ckpt.read(b_path, np.float32))
      a, b = (adapter[k] if e.stack_index is None else adapter[k][e.stack_index]
              for k in ("a", "b"))
      x = np.asarray(lora.merged_kernel({"kernel": x, lora.LORA_A: a, lora.LORA_B: b}, spec))
    elif e.flax_path in torch_linear:
      return x  # read cast and transposed
    return to_hf_layout(x, e.transform, np_dtype)

  def write(path: str) -> list[str]:
    try:
      with progress.Progress(total, f"exporting step {step}", unit="B",
                             enabled=show_progress) as bar:
        files = io.write_weights(path, [(name(e), e.hf_shape) for e in ordered], produce,
                                 np_dtype, max_shard_size, on_written=bar.update)
      if peft_out is not None:  # read while the checkpoint is open
        peft_tree["tree"] = adapter_tree(ckpt, adapted)
    finally:
      leaves.close()
    if llm_only:
      _write_qwen3_configs(path, model_config, np_dtype, token_ids, tok_path)
    else:
      io.write_model_configs(path, model_config, np_dtype, token_ids,
                             bool(config.get("data", {}).get("time_markers", True)),
                             tokenizer=tok_path)
    with open(os.path.join(path, RUN_CONFIG_IN_EXPORT), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return files

  peft_tree: dict = {}
  t0 = time.perf_counter()
  files = _write_into(out, overwrite, write)
  if peft_out is not None:
    _write_into(peft_out, overwrite, lambda path: peft_io.save_adapter(
        path, peft_tree.pop("tree"), config.model, dtype=np_dtype,
        base_model_name_or_path=config.train.get("init_from", "")))
  return ExportResult(step, os.fspath(out), files, total, time.perf_counter() - t0)


def adapter_tree(ckpt: CheckpointParams, adapted) -> dict:
  """The tree hf.peft.save_adapter takes: the adapters' values (float32; they are small) and the
  base leaves as their metadata only, since save_adapter needs the tree's structure (which
  modules, scanned or not) but never the base values."""
  tree = _nest(dict(ckpt.leaves))
  for a_path, b_path in adapted.values():
    for p in (a_path, b_path):
      mapping.set_leaf(tree, p, ckpt.read(p, np.float32))
  return tree


def to_hf_layout(x: np.ndarray, transform: str, dtype: np.dtype) -> np.ndarray:
  """One tensor in torch layout and `dtype`, C-contiguous, ready to write (kernels that were not
  read in torch layout already: LoRA-merged ones, convolutions)."""
  y = np.asarray(x).astype(dtype, copy=False)
  if transform != mapping.LINEAR or y.ndim != 2:
    return np.ascontiguousarray(mapping.to_hf(transform, y))
  out = np.empty(y.shape[::-1], y.dtype)
  _transpose_into(out, y)
  return out


def _write_qwen3_configs(path, model_config, np_dtype, token_ids, tokenizer) -> None:
  """config.json / generation_config.json of a plain Qwen3ForCausalLM, plus the tokenizer."""
  hf = config_io.hf_config_from_model(model_config, np_dtype.name, token_ids)
  qwen = dict(hf["language_config"], transformers_version=config_io.TRANSFORMERS_VERSION)
  config_io.write_json(os.path.join(path, "config.json"), qwen)
  config_io.write_json(os.path.join(path, "generation_config.json"),
                       config_io.generation_config(token_ids))
  if tokenizer:
    io.copy_tokenizer(tokenizer, path)


# ----------------------------------------------------------------------------- import

def import_hf(hf_dir, run_dir, config: ml_collections.ConfigDict | None = None,
              overwrite: bool = False) -> int:
  """Writes a run directory (checkpoint at step 0 + config.json) from a reference-format dir.

  `config` is the base training config (default configs/pretrain.py:4b); its `model` section is
  replaced by the directory's shapes (keeping scan_layers, remat and dtypes), and its tokenizer
  by the directory's own tokenizer files and special ids. The checkpoint holds the parameters
  only (no optimizer state): start training from it with
  --config.train.init_from_checkpoint=RUN/checkpoints. Returns the step written (0).
  """
  hf_dir = os.fspath(hf_dir)
  if not os.path.isfile(os.path.join(hf_dir, "config.json")):
    raise UserError(f"--from_hf {hf_dir}: no config.json (not a reference-format directory)")
  if config is None:
    config = pretrain.get_config("4b")
  config = ml_collections.ConfigDict(config.to_dict())
  ours = config.model
  overrides = {"dtype": ours.dtype, "param_dtype": ours.param_dtype,
               "scan_layers": ours.scan_layers, "remat_policy": ours.remat_policy}
  try:
    model, params = hf.load_pretrained(hf_dir, dtype=ours.param_dtype, config_overrides=overrides)
  except (ValueError, FileNotFoundError) as e:  # CheckpointMismatchError is a ValueError
    raise UserError(f"--from_hf {hf_dir}: {e}") from None
  config.model = model.config
  ids = config_io.read_token_ids(hf_dir)
  tok = config.data.tokenizer
  for ours_name, theirs in _ID_NAMES:
    tok[ours_name] = int(ids[theirs])
  proc_path = os.path.join(hf_dir, "processor_config.json")
  if os.path.exists(proc_path):
    config.data.time_markers = bool(config_io.read_json(proc_path).get("enable_time_marker", True))
  run = _absolute(run_dir)

  def write(path: str) -> int:
    tok_names = [n for n in io.TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    if tok_names:
      tok_dir = os.path.join(path, "tokenizer")
      os.makedirs(tok_dir)
      io.copy_tokenizer(hf_dir, tok_dir)
      tok.kind = "hf" if "tokenizer.json" in tok_names else "sentencepiece"
      tok.path = os.path.join(os.fspath(run), "tokenizer") + (
          "" if tok.kind == "hf" else "/tokenizer.model")
    elif tok.get("path"):
      logging.warning("%s has no tokenizer files; the run keeps data.tokenizer.path=%s",
                      hf_dir, tok.path)
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    trainable, frozen = optim.partition(params, optim.trainable_mask(params, "full"))
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "frozen": frozen}
    ckpt = checkpoint.Checkpointer(os.path.join(path, CHECKPOINTS), every=0, keep=0,
                                   async_save=False)
    try:
      ckpt.save(0, state, {}, config.to_dict(), force=True)
    finally:
      ckpt.close()
    return 0

  return _write_into(run, overwrite, write)


# ----------------------------------------------------------------------------- command line

def define_flags() -> dict[str, Any]:
  """The command's flags; defined only when run as a program, since `train` imports this
  module (train.export_at_end) and defines a --config of its own."""
  return dict(
      workdir=flags.DEFINE_string("workdir", None, "Training run to export (holds checkpoints/)."),
      step=flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest complete)."),
      output_dir=flags.DEFINE_string("output_dir", None, "Directory to write (must hold no files)."),
      dtype=flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Tensor dtype of the export."),
      max_shard_size=flags.DEFINE_string("max_shard_size", "5GB",
                                         "Split the weights above this size (5GB, 4GiB)."),
      tokenizer=flags.DEFINE_string("tokenizer", None, "Tokenizer to ship (default: the run's)."),
      llm_only=flags.DEFINE_bool("llm_only", False, "Export the Qwen3 LLM as Qwen3ForCausalLM."),
      overwrite=flags.DEFINE_bool("overwrite", False, "Replace an existing output directory."),
      peft_adapter_dir=flags.DEFINE_string(
          "peft_adapter_dir", None, "LoRA runs: also write the adapters in PEFT's format here "
          "(--output_dir always gets the merged weights)."),
      from_hf=flags.DEFINE_string("from_hf", None,
                                  "Reference-format directory to turn into a run directory."),
      config=config_flags.DEFINE_config_file(
          "config", None, "With --from_hf: the run's base training config (default "
          "configs/pretrain.py:4b).", lock_config=False))


_FLAGS: dict[str, Any] = {}


def main(argv: Sequence[str]) -> int:
  del argv
  f = {name: holder.value for name, holder in _FLAGS.items()}
  cli.require("output_dir")
  if bool(f["from_hf"]) == bool(f["workdir"]):
    raise UserError("give exactly one of --workdir (export a run) and --from_hf (import a model)")
  if f["from_hf"]:
    import_hf(f["from_hf"], f["output_dir"], f["config"], overwrite=f["overwrite"])
    print(f"wrote run {f['output_dir']} from {f['from_hf']}; train from it with "
          f"--config.train.init_from_checkpoint={f['output_dir']}/{CHECKPOINTS}")
    return 0
  r = export_run(f["workdir"], f["output_dir"], f["step"], f["dtype"], f["max_shard_size"],
                 f["tokenizer"], f["llm_only"], f["overwrite"],
                 peft_adapter_dir=f["peft_adapter_dir"])
  print(f"exported step {r.step} of {f['workdir']} to {r.output_dir}: {len(r.files)} weight "
        f"file(s), {r.tensor_bytes / 1e6:.1f} MB in {r.seconds:.1f} s "
        f"({r.tensor_bytes / 1e6 / max(r.seconds, 1e-9):.0f} MB/s)")
  return 0


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  cli.run(main)
