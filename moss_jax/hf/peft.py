r"""LoRA adapters in PEFT's format, for the reference PyTorch model (and back).

`save_adapter` writes what `peft.PeftModel.from_pretrained(reference_model, DIR)` loads:

  adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, use_rslora and
                               target_modules = the exact reference module names adapted
  adapter_model.safetensors    base_model.model.<reference module>.lora_A.weight  [r, in]
                               base_model.model.<reference module>.lora_B.weight  [out, r]

Module names come from the one name table (hf/mapping.py): our kernel `language_model/layers/
self_attn/q_proj/kernel` (layer i of the stack) is the reference's `language_model.layers.{i}.
self_attn.q_proj.weight`, so its adapter is PEFT's `language_model.layers.{i}.self_attn.q_proj`.
Our A [in, r] and B [r, out] are PEFT's lora_A.weight / lora_B.weight transposed; PEFT's
forward adds lora_B(lora_A(dropout(x))) * scaling with scaling = alpha / r (alpha / sqrt(r) with
use_rslora), the same as ours. `load_adapter` reads such a directory (ours, or one the
reference's PEFT fine-tune wrote) into a parameter tree.

Only adapters of dense layers are exported: modules trained in full alongside (PEFT's
`modules_to_save`) are not; export the merged model (`lora.merge_adapters` + `save_pretrained`)
for those. From a training run:

  python -m moss_jax.hf.peft --workdir /tmp/lora_run --out /tmp/lora_adapter \
      [--merged_out /tmp/merged] [--step N] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from moss_jax import checkpoint, cli, sharding
from moss_jax.errors import UserError
from moss_jax.hf import config_io, io, mapping
from moss_jax.hf.safetensors_file import SafetensorsFile, write_file
from moss_jax.model import MossAudioModel, abstract_params, lora, param_shardings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(ValueError):
  """An adapter directory or tree that does not fit the model (names every offending tensor)."""


def _targets(params: Mapping, model_config) -> list[tuple[mapping.Entry, str]]:
  """(kernel entry, reference module name) for every adapted dense layer, in manifest order."""
  modules = {tuple(p) for p in lora.adapter_modules(params)}
  out = []
  for e in mapping.entries(model_config, mapping.tree_is_scanned(params)):
    if e.transform == mapping.LINEAR and e.flax_path[:-1] in modules:
      out.append((e, e.hf_key[:-len(".weight")]))
  found = {e.flax_path[:-1] for e, _ in out}
  missing = sorted("/".join(m) for m in modules - found)
  if missing:
    raise AdapterError(f"adapters on modules with no reference name: {missing}")
  return out


def _slice(leaf, index: int | None) -> np.ndarray:
  arr = np.asarray(leaf)
  return arr if index is None else arr[index]


def adapter_tensors(params: Mapping, model_config) -> dict[str, np.ndarray]:
  """{PEFT key: torch-layout array} of every adapter in `params` (float32 host arrays)."""
  out = {}
  for entry, module in _targets(params, model_config):
    node = mapping.get_leaf(params, entry.flax_path[:-1])
    a = _slice(node[lora.LORA_A], entry.stack_index).astype(np.float32)
    b = _slice(node[lora.LORA_B], entry.stack_index).astype(np.float32)
    out[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
  return out


def adapter_config(spec: lora.LoraSpec, target_modules: list[str],
                   base_model_name_or_path: str = "") -> dict[str, Any]:
  """PEFT's LoraConfig fields (only ones every PEFT >= 0.7 knows)."""
  return {
      "peft_type": "LORA",
      "task_type": None,
      "base_model_name_or_path": base_model_name_or_path or None,
      "r": spec.rank,
      "lora_alpha": spec.alpha,
      "lora_dropout": spec.dropout,
      "use_rslora": spec.rslora,
      "target_modules": target_modules,
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "modules_to_save": None,
      "inference_mode": True,
  }


def save_adapter(path: str, params: Mapping, model_config, dtype=jnp.float32,
                 base_model_name_or_path: str = "") -> list[str]:
  """Writes adapter_config.json + adapter_model.safetensors into `path`; returns the module names.

  `params` is the full tree (base and adapters; `{"params": tree}` is accepted) and
  `model_config` config.model with the LoRA spec the run trained with.
  """
  params = params["params"] if set(params) == {"params"} else params
  spec = lora.spec_from_config(model_config)
  if spec is None:
    raise AdapterError("model_config has no LoRA spec (model.lora.rank is 0)")
  if not lora.has_adapters(params):
    raise AdapterError("the parameter tree holds no LoRA adapters")
  tensors = adapter_tensors(params, model_config)
  modules = [m for _, m in _targets(params, model_config)]
  np_dtype = np.dtype(jnp.dtype(dtype))
  os.makedirs(path, exist_ok=True)
  write_file(os.path.join(path, ADAPTER_WEIGHTS),
             [(k, v.shape, np_dtype) for k, v in tensors.items()],
             lambda k: tensors[k].astype(np_dtype), metadata={"format": "pt"})
  config_io.write_json(os.path.join(path, ADAPTER_CONFIG),
                       adapter_config(spec, modules, base_model_name_or_path))
  return modules


def read_adapter_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.isfile(file):
    raise AdapterError(f"no {ADAPTER_CONFIG} in {path}")
  with open(file, encoding="utf-8") as f:
    cfg = json.load(f)
  if cfg.get("peft_type") != "LORA":
    raise AdapterError(f"{file}: peft_type is {cfg.get('peft_type')!r}, only LORA is supported")
  for key in ("rank_pattern", "alpha_pattern"):
    if cfg.get(key):
      raise AdapterError(f"{file}: per-module {key} is not supported")
  if cfg.get("use_dora"):
    raise AdapterError(f"{file}: DoRA adapters are not supported")
  return cfg


def spec_from_adapter_config(cfg: Mapping[str, Any], module_paths: list[tuple[str, ...]]
                             ) -> lora.LoraSpec:
  """The LoraSpec of a PEFT config whose adapters sit on `module_paths` (our module paths):
  its targets are exactly those paths."""
  targets = ("|".join(re.escape("/".join(p)) for p in module_paths),)
  return lora.LoraSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                       dropout=float(cfg.get("lora_dropout") or 0.0),
                       rslora=bool(cfg.get("use_rslora", False)), targets=targets)


def lora_config_dict(spec: lora.LoraSpec) -> dict[str, Any]:
  """config.model.lora fields for a spec (to build the model that applies loaded adapters)."""
  return dict(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, rslora=spec.rslora,
              targets=",".join(spec.targets))


def load_adapter(path: str, params: Mapping, model_config) -> tuple[dict, lora.LoraSpec]:
  """(params with the directory's adapters added, their spec). `params` is a base tree of the
  model (adapters already in it are replaced); `model_config` gives the name table. Set
  config.model.lora to `lora_config_dict(spec)` for the model that applies them."""
  cfg = read_adapter_config(path)
  rank = int(cfg["r"])
  weights = os.path.join(path, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights):
    raise AdapterError(f"no {ADAPTER_WEIGHTS} in {path}")
  st = SafetensorsFile(weights)
  names = set(st.keys())
  base, _ = lora.split(params)
  by_module: dict[tuple[str, ...], dict[str, list]] = {}
  used = set()
  for e in mapping.entries(model_config, mapping.tree_is_scanned(base)):
    if e.transform != mapping.LINEAR:
      continue
    module = e.hf_key[:-len(".weight")]
    ka, kb = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
    if ka not in names and kb not in names:
      continue
    if ka not in names or kb not in names:
      raise AdapterError(f"{weights}: {module} has only one of lora_A / lora_B")
    a, b = st.get(ka).astype(np.float32).T, st.get(kb).astype(np.float32).T
    in_dim, out_dim = e.flax_shape
    if a.shape != (in_dim, rank) or b.shape != (rank, out_dim):
      raise AdapterError(f"{weights}: {module} lora_A {a.shape[::-1]} / lora_B "
                         f"{b.shape[::-1]} do not fit a [{out_dim}, {in_dim}] weight at rank "
                         f"{rank}")
    slot = by_module.setdefault(e.flax_path[:-1], {"a": [], "b": [], "stacked": []})
    slot["a"].append(a)
    slot["b"].append(b)
    slot["stacked"].append(e.stack_index is not None)
    used.update((ka, kb))
  unknown = sorted(names - used)
  if unknown:
    raise AdapterError(f"{weights}: tensors that adapt no module of this model: {unknown[:10]}"
                       f"{' ...' if len(unknown) > 10 else ''}")
  if not by_module:
    raise AdapterError(f"{weights} holds no LoRA tensors")
  out = _copy_tree(base)
  for module_path, slot in by_module.items():
    node = mapping.get_leaf(out, module_path)
    kernel_dtype = node["kernel"].dtype
    if slot["stacked"][0]:
      n = np.asarray(node["kernel"]).shape[0]
      if len(slot["a"]) != n:
        raise AdapterError(f"{weights}: {'/'.join(module_path)} has adapters for "
                           f"{len(slot['a'])} of {n} layers; PEFT layers_to_transform is not "
                           "supported")
      a, b = np.stack(slot["a"]), np.stack(slot["b"])
    else:
      a, b = slot["a"][0], slot["b"][0]
    node[lora.LORA_A] = jnp.asarray(a, kernel_dtype)
    node[lora.LORA_B] = jnp.asarray(b, kernel_dtype)
  return out, spec_from_adapter_config(cfg, list(by_module))


def _copy_tree(tree: Mapping) -> dict:
  """A copy of the nested dicts (leaves shared), so adding adapters leaves the input untouched."""
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# ----------------------------------------------------------------------------- command line

def main(argv) -> int:
  """Adapter (and optionally merged weights) of a LoRA training run's newest checkpoint."""
  del argv
  f = flags.FLAGS
  cli.require("workdir", "out")
  config_path = os.path.join(f.workdir, "config.json")
  if not os.path.isfile(config_path):
    raise UserError(f"{config_path} not found: --workdir must be a training run directory")
  with open(config_path, encoding="utf-8") as fh:
    config = ml_collections.ConfigDict(json.load(fh))
  if lora.spec_from_config(config.model) is None:
    raise UserError(f"the run in {f.workdir} has no LoRA adapters (model.lora.rank is 0)")
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"shape": (1, -1, 1)}))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config.model), param_shardings(config.model, mesh))
  try:
    params = checkpoint.restore_params(os.path.join(f.workdir, "checkpoints"), abstract,
                                       step=f.step)
  except FileNotFoundError as e:
    raise UserError(str(e)) from None
  dtype = jnp.dtype(f.dtype)
  modules = save_adapter(f.out, params, config.model, dtype=dtype,
                         base_model_name_or_path=config.train.get("init_from", ""))
  print(f"wrote {len(modules)} LoRA modules to {f.out}/{ADAPTER_WEIGHTS} (+ {ADAPTER_CONFIG})")
  if f.merged_out:
    base_config = lora.base_model_config(config.model)
    merged = lora.merge_adapters(params, config.model)
    files = io.save_pretrained(f.merged_out, MossAudioModel(base_config), merged, dtype=dtype)
    print(f"wrote the merged model to {f.merged_out} ({', '.join(files)})")
  return 0


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "LoRA training run directory (config.json, checkpoints/).")
  flags.DEFINE_string("out", None, "Output directory for the PEFT adapter.")
  flags.DEFINE_string("merged_out", "", "Also write merged weights in the reference format here.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest complete one).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Tensor dtype in the files.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
