"""Load and save checkpoints in the reference (Hugging Face, PyTorch-layout safetensors) format.

`load_pretrained` reads an official MOSS-Audio directory (or one we wrote) into our Flax tree;
`save_pretrained` writes a directory the official PyTorch code, vLLM and SGLang load unchanged
(spec 6.3); `load_qwen3_llm` initialises only the LLM + lm_head from a plain Qwen3 causal-LM.
All three walk the mapping table one tensor at a time, so peak host memory is one (stacked)
leaf, never a second copy of the model.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moss_jax import paths, progress
from moss_jax.hf import config_io, mapping
from moss_jax.hf.safetensors_file import SafetensorsFile, write_file
from moss_jax.model import MossAudioModel, param_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Files of a released repo that save_pretrained takes from `source_dir` (spec 6.3): copied
# verbatim, except the processor / generation configs, which are the base of the ones written.
AUX_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt",
             "added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
             "configuration_moss_audio.py", "processing_moss_audio.py", "processor_config.json",
             "generation_config.json")


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors differ from what the config implies; the message lists all of them."""


# ---------------------------------------------------------------------------------------------
# Reading


class CheckpointReader:
  """All tensors of a directory: one model.safetensors, or shards listed by the index file."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
      weight_map = config_io.read_json(index)["weight_map"]
      files = {f: SafetensorsFile(os.path.join(path, f)) for f in sorted(set(weight_map.values()))}
      self._where = {}
      for f, st in files.items():
        for name in st.keys():
          self._where[name] = st
      listed_missing = sorted(n for n, f in weight_map.items() if n not in files[f].header)
      if listed_missing:
        raise CheckpointMismatchError(f"{index} lists tensors its shards lack: {listed_missing}")
    elif os.path.exists(single):
      st = SafetensorsFile(single)
      self._where = {name: st for name in st.keys()}
    else:
      raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get(name)

  def raw_bytes(self, name: str) -> bytes:
    return self._where[name].raw_bytes(name)


def check_names_and_shapes(expected: Mapping[str, tuple[int, ...]], reader: CheckpointReader,
                           allowed_extra: tuple[str, ...] = ()) -> None:
  """Raises CheckpointMismatchError naming every missing, unknown and mis-shaped tensor."""
  present = set(reader.keys())
  missing = sorted(set(expected) - present)
  unknown = sorted(present - set(expected) - set(allowed_extra))
  misshaped = [f"{n}: file {reader.shape(n)}, expected {tuple(expected[n])}"
               for n in expected if n in present and reader.shape(n) != tuple(expected[n])]
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {missing}")
  if unknown:
    problems.append(f"unknown {len(unknown)} tensor(s): {unknown}")
  if misshaped:
    problems.append(f"mis-shaped {len(misshaped)} tensor(s): {misshaped}")
  if problems:
    raise CheckpointMismatchError(f"checkpoint {reader.path} does not match the config: "
                                  + "; ".join(problems))


def _group_by_leaf(entries: list[mapping.Entry]) -> dict[tuple[str, ...], list[mapping.Entry]]:
  groups: dict[tuple[str, ...], list[mapping.Entry]] = collections.OrderedDict()
  for e in entries:
    groups.setdefault(e.flax_path, []).append(e)
  return groups


def _build_leaf(group: list[mapping.Entry], fetch, dtype) -> np.ndarray:
  """One Flax leaf from its HF tensors (several for a scanned stack), in `dtype`, on the host."""
  if group[0].stack_index is None:
    return np.asarray(mapping.from_hf(group[0].transform, fetch(group[0].hf_key)), dtype=dtype)
  out = np.empty((len(group),) + group[0].flax_shape, dtype=dtype)
  for e in group:
    out[e.stack_index] = mapping.from_hf(e.transform, fetch(e.hf_key))
  return out


def _place(value: np.ndarray, sharding=None) -> jax.Array:
  return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def load_pretrained(path: str, dtype=jnp.float32, config_overrides: Mapping[str, Any] | None = None,
                    mesh=None):
  """Reads a reference-format directory -> (MossAudioModel, params).

  Args:
    path: directory with config.json and model.safetensors (or shards + index).
    dtype: dtype of the returned params; also the model's compute dtype unless overridden.
    config_overrides: {"dtype": "bfloat16", "scan_layers": False, ...} applied to config.model.
    mesh: when given, every leaf is placed with its sharding from `moss_jax.sharding`.
  """
  model_config = config_from_pretrained(path, dtype, config_overrides)
  reader = CheckpointReader(path)
  entries = mapping.entries(model_config)
  check_names_and_shapes({e.hf_key: e.hf_shape for e in entries}, reader)
  shardings = param_shardings(model_config, mesh) if mesh is not None else None
  params: dict = {}
  np_dtype = jnp.dtype(model_config.param_dtype)
  with progress.Progress(len(entries), f"loading {path}", unit=" tensors") as bar:
    for flax_path, group in _group_by_leaf(entries).items():
      value = _build_leaf(group, reader.get, np_dtype)
      sharding = mapping.get_leaf(shardings, flax_path) if shardings is not None else None
      mapping.set_leaf(params, flax_path, _place(value, sharding))
      bar.update(len(group))
  return MossAudioModel(config=model_config), params


def config_from_pretrained(path: str, dtype=jnp.float32,
                           config_overrides: Mapping[str, Any] | None = None
                           ) -> ml_collections.ConfigDict:
  """config.model for a reference-format directory (what load_pretrained builds the model with)."""
  hf_config = config_io.read_json(os.path.join(path, "config.json"))
  model_config = config_io.model_config_from_hf(hf_config)
  name = jnp.dtype(dtype).name
  model_config.param_dtype = name
  model_config.dtype = name
  return config_io.apply_overrides(model_config, config_overrides)


# ---------------------------------------------------------------------------------------------
# Writing


def parse_size(size: int | str) -> int:
  """Bytes from 5000000000, "5GB" (10^9) or "4GiB" (2^30), as transformers reads max_shard_size."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
  if not m:
    raise ValueError(f"cannot read a size from {size!r}")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
  return int(float(m.group(1)) * base ** power)


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
  """Greedy split in manifest order; a tensor larger than the limit gets a shard of its own."""
  shards: list[list[str]] = []
  current, used = [], 0
  for name, size in sizes:
    if current and used + size > max_shard_size:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += size
  if current:
    shards.append(current)
  return shards


def check_tree(params: Mapping, model_config) -> None:
  """Raises naming every Flax leaf the table does not know, lacks, or sees with the wrong shape."""
  expected = mapping.flax_shapes(model_config, mapping.tree_is_scanned(params))
  leaves = mapping.flatten_leaves(params)
  missing = sorted("/".join(p) for p in set(expected) - set(leaves))
  unknown = sorted("/".join(p) for p in set(leaves) - set(expected))
  misshaped = sorted(f"{'/'.join(p)}: {tuple(leaves[p].shape)}, expected {expected[p]}"
                     for p in set(expected) & set(leaves) if tuple(leaves[p].shape) != expected[p])
  problems = [f"{label} {items}" for label, items in
              (("missing", missing), ("unknown", unknown), ("mis-shaped", misshaped)) if items]
  if problems:
    raise CheckpointMismatchError("params do not match the model config: " + "; ".join(problems))


def _unwrap(params: Mapping) -> Mapping:
  return params["params"] if set(params) == {"params"} else params


def save_pretrained(path: str, model, params: Mapping, dtype=jnp.bfloat16,
                    max_shard_size: int | str = "5GB", token_ids: Mapping[str, int] | None = None,
                    source_dir: str | None = None, enable_time_marker: bool | None = None,
                    tokenizer: str | None = None) -> list[str]:
  """Writes the reference format; returns the weight files written.

  Args:
    path: output directory (created; old model*.safetensors / index files there are removed).
    model: a MossAudioModel (its `config` gives the shapes and config.json fields).
    params: the Flax tree (scanned or unrolled; `{"params": tree}` is accepted).
    dtype: tensor dtype in the files (the released checkpoints are bfloat16).
    max_shard_size: bytes or "5GB"; above it the weights are split with an index file.
    token_ids: special ids for config.json / processor_config.json / generation_config.json
      (audio_token_id, audio_start_id, audio_end_id, bos_token_id, eos_token_id); default: those
      of `source_dir`, else the Qwen3 reference ids.
    source_dir: a released directory whose tokenizer / chat template / remote-code files are
      copied, and whose processor / generation configs are the base of ours (fields not set
      here, such as a chat template's extras, are kept).
    enable_time_marker: processor_config.json's flag (default: source_dir's, else True).
    tokenizer: the tokenizer the model was trained with (a tokenizer.json, a directory holding
      one, or a sentencepiece .model); its files are copied (after source_dir's).
  """
  if paths.is_uri(path):
    # A bucket (gs://): the files are written locally (safetensors via a temporary file and a
    # rename), then copied up; the old weight files there are removed first, as locally.
    target = paths.run_path(path)
    with tempfile.TemporaryDirectory(prefix="moss_jax_export_") as staging:
      files = save_pretrained(staging, model, params, dtype, max_shard_size, token_ids,
                              source_dir, enable_time_marker)
      if target.exists():
        for old in target.iterdir():
          if _is_weight_file(old.name):
            old.unlink()
      paths.copy_tree(staging, target)
    return files
  params = _unwrap(params)
  model_config = model.config
  check_tree(params, model_config)
  entries = mapping.entries(model_config, mapping.tree_is_scanned(params))
  by_name = {e.hf_key: e for e in entries}
  np_dtype = np.dtype(jnp.dtype(dtype))
  os.makedirs(path, exist_ok=True)
  with progress.Progress(len(entries), f"saving {path}", unit=" tensors") as bar:
    files = write_weights(path, [(e.hf_key, e.hf_shape) for e in entries],
                          lambda name: mapping.export_tensor(params, by_name[name]), np_dtype,
                          max_shard_size, on_written=lambda _: bar.update(1))
  write_model_configs(path, model_config, np_dtype, token_ids, enable_time_marker, source_dir,
                      tokenizer)
  return files


def write_weights(path: str, tensors: list[tuple[str, tuple[int, ...]]], produce,
                  dtype, max_shard_size: int | str = "5GB", on_written=None) -> list[str]:
  """Writes `tensors` (name, torch-layout shape), in this order, as safetensors files in `path`.

  `produce(name)` returns one tensor (any float dtype; cast to `dtype` here) when its turn to be
  written comes, so at most one tensor is in memory. One model.safetensors, or
  model-0000k-of-0000n.safetensors + model.safetensors.index.json above `max_shard_size`. Stale
  weight files in `path` are removed first. `on_written(nbytes)` is called after each tensor
  (progress bars). Returns the weight file names.
  """
  np_dtype = np.dtype(dtype)
  _remove_old_weights(path)
  sizes = [(name, int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize)
           for name, shape in tensors]
  shapes = dict(tensors)
  shards = plan_shards(sizes, parse_size(max_shard_size))
  files = [SINGLE_FILE] if len(shards) <= 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

  def cast(name):
    arr = np.asarray(produce(name))
    out = arr.astype(np_dtype, copy=False)
    if on_written is not None:
      on_written(out.nbytes)
    return out

  for fname, names in zip(files, shards or [[]]):
    specs = [(n, shapes[n], np_dtype) for n in names]
    write_file(os.path.join(path, fname), specs, cast, metadata={"format": "pt"})
  if len(files) > 1:
    weight_map = {n: f for f, names in zip(files, shards) for n in names}
    config_io.write_json(os.path.join(path, INDEX_FILE), {
        "metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map})
  return files


def _is_weight_file(name: str) -> bool:
  return name in (SINGLE_FILE, INDEX_FILE) or bool(SHARD_PATTERN.match(name))


def _remove_old_weights(path: str) -> None:
  for name in os.listdir(path):
    if _is_weight_file(name):
      os.remove(os.path.join(path, name))


def write_model_configs(path: str, model_config, dtype, token_ids: Mapping[str, int] | None = None,
                        enable_time_marker: bool | None = None, source_dir: str | None = None,
                        tokenizer: str | None = None) -> None:
  """config.json, processor_config.json, generation_config.json, tokenizer and remote-code files.

  Files of `source_dir` are copied first, then the configs are written over them from the
  arguments (a released processor / generation config is the base, our ids and flags win), and
  `auto_map` names the remote-code files only when they are really in `path`: transformers'
  trust_remote_code loading fails on an auto_map whose files are missing.
  """
  np_dtype = np.dtype(jnp.dtype(dtype))
  base_proc, base_gen = {}, {}
  if source_dir:
    if token_ids is None:
      token_ids = config_io.read_token_ids(source_dir)
    for name in AUX_FILES:
      src = os.path.join(source_dir, name)
      if not os.path.exists(src):
        continue
      if name == "processor_config.json":
        base_proc = config_io.read_json(src)
      elif name == "generation_config.json":
        base_gen = config_io.read_json(src)
      else:
        shutil.copyfile(src, os.path.join(path, name))
  if tokenizer:
    copy_tokenizer(tokenizer, path)
  if enable_time_marker is None:
    enable_time_marker = bool(base_proc.get("enable_time_marker", True))
  remote = {f for f in REMOTE_CODE_FILES if os.path.exists(os.path.join(path, f))}
  config = config_io.hf_config_from_model(model_config, np_dtype.name, token_ids)
  proc = dict(base_proc, **config_io.processor_config(token_ids, enable_time_marker))
  for obj in (config, proc):
    _keep_present_auto_map(obj, remote)
  config_io.write_json(os.path.join(path, "config.json"), config)
  config_io.write_json(os.path.join(path, "processor_config.json"), proc)
  config_io.write_json(os.path.join(path, "generation_config.json"),
                       dict(base_gen, **config_io.generation_config(token_ids)))


REMOTE_CODE_FILES = ("configuration_moss_audio.py", "processing_moss_audio.py")
# Files of a Hugging Face tokenizer directory, copied beside an export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def _keep_present_auto_map(obj: dict, present: set[str]) -> None:
  """Drops auto_map entries ("module.Class") whose module file is not in the directory."""
  auto = obj.get("auto_map")
  if not auto:
    return
  kept = {k: v for k, v in auto.items() if f"{str(v).split('.')[0]}.py" in present}
  if kept:
    obj["auto_map"] = kept
  else:
    obj.pop("auto_map")


def copy_tokenizer(tokenizer: str, path: str) -> list[str]:
  """Copies a tokenizer's files into `path`: a directory's tokenizer files, or one file
  (tokenizer.json, or a sentencepiece model, stored as tokenizer.model). Returns the names."""
  if os.path.isdir(tokenizer):
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, n))]
    if not names:
      raise FileNotFoundError(f"tokenizer directory {tokenizer} holds none of {TOKENIZER_FILES}")
    for n in names:
      shutil.copyfile(os.path.join(tokenizer, n), os.path.join(path, n))
    return names
  if not os.path.isfile(tokenizer):
    raise FileNotFoundError(f"tokenizer not found: {tokenizer}")
  name = "tokenizer.json" if tokenizer.endswith(".json") else "tokenizer.model"
  shutil.copyfile(tokenizer, os.path.join(path, name))
  return [name]


# ---------------------------------------------------------------------------------------------
# Qwen3 LLM initialisation


def load_qwen3_llm(path: str, params_or_abstract: Mapping, dtype=None) -> dict:
  """Fills language_model/* and lm_head/* of a tree from a plain Qwen3 causal-LM checkpoint.

  Args:
    path: a Qwen3ForCausalLM directory (config.json + safetensors with `model.*`, `lm_head.*`).
    params_or_abstract: our param tree, real arrays or jax.ShapeDtypeStruct leaves (scanned or
      unrolled). Its LLM leaves give the expected shapes, dtypes and shardings.
    dtype: overrides the leaves' dtype.

  Returns a new tree: LLM leaves loaded, every other leaf passed through unchanged. With
  tie_word_embeddings (Qwen3-0.6B/1.7B/4B) lm_head is initialised from the embedding table.
  """
  tree = _unwrap(params_or_abstract)
  qcfg = config_io.read_json(os.path.join(path, "config.json"))
  text = _qwen3_text_config(qcfg)
  cfg = ml_collections.ConfigDict({"text": text.to_dict(),
                                   "scan_layers": mapping.tree_is_scanned(tree)})
  entries = mapping.entries(cfg, parts=mapping.LLM_PARTS)
  tied = bool(qcfg.get("tie_word_embeddings", False))
  names = {mapping.rename_for_qwen3(e.hf_key): e for e in entries}
  reader = CheckpointReader(path)
  expected = {n: e.hf_shape for n, e in names.items()}
  if tied:
    expected.pop("lm_head.weight")
  check_names_and_shapes(expected, reader, allowed_extra=("lm_head.weight",) if tied else ())
  _check_tree_shapes(tree, entries)
  fetch = lambda key: reader.get(_qwen3_source(mapping.rename_for_qwen3(key), tied))
  out = _copy_tree(tree)
  with progress.Progress(len(entries), f"loading {path}", unit=" tensors") as bar:
    for flax_path, group in _group_by_leaf(entries).items():
      leaf = mapping.get_leaf(tree, flax_path)
      leaf_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(leaf.dtype)
      value = _build_leaf(group, fetch, np.dtype(leaf_dtype))
      mapping.set_leaf(out, flax_path, _place(value, getattr(leaf, "sharding", None)))
      bar.update(len(group))
  return out


def _qwen3_source(qwen3_key: str, tied: bool) -> str:
  return "model.embed_tokens.weight" if tied and qwen3_key == "lm_head.weight" else qwen3_key


def _qwen3_text_config(qcfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  problems = []
  if qcfg.get("attention_bias", False):
    problems.append("attention_bias")
  if qcfg.get("rope_scaling"):
    problems.append(f"rope_scaling {qcfg['rope_scaling']}")
  if qcfg.get("use_sliding_window", False):
    problems.append("sliding-window attention")
  if problems:
    raise ValueError(f"Qwen3 config asks for what this model does not implement: {problems}")
  t = ml_collections.ConfigDict()
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads"):
    t[key] = int(qcfg[key])
  t.head_dim = int(qcfg.get("head_dim") or qcfg["hidden_size"] // qcfg["num_attention_heads"])
  return t


def _check_tree_shapes(tree: Mapping, entries: list[mapping.Entry]) -> None:
  """The target tree's LLM leaves must have the checkpoint's shapes (names every mismatch)."""
  problems = []
  for flax_path, group in _group_by_leaf(entries).items():
    want = group[0].flax_shape
    if group[0].stack_index is not None:
      want = (len(group),) + want
    try:
      got = tuple(mapping.get_leaf(tree, flax_path).shape)
    except KeyError:
      problems.append(f"{'/'.join(flax_path)}: not in the param tree")
      continue
    if got != want:
      problems.append(f"{'/'.join(flax_path)}: tree {got}, checkpoint gives {want}")
  if problems:
    raise CheckpointMismatchError("the Qwen3 checkpoint does not fit the model's LLM: "
                                  + "; ".join(problems))


def _copy_tree(tree: Mapping) -> dict:
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
