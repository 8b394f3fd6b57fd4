"""LoRA adapters on any dense layer, chosen by name patterns (config.model.lora).

A targeted Dense computes  y = x W (+ b) + scale * (dropout(x) A) B  with A [in, r] and B [r, out]
stored beside the kernel as `lora_a` / `lora_b` (so a scanned layer stack stacks them on the
layer axis exactly like its kernels, and their logical axes follow the kernel's: A shares the
kernel's input axis, B its output axis). B starts at zero, so a fresh adapter leaves the model's
function unchanged; A starts like PEFT's (kaiming-uniform with a = sqrt(5): U(+-1/sqrt(in))).
scale = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023): with alpha / r a larger
rank shrinks the update, with rsLoRA it does not.

Config (config.model.lora; rank 0 = off):
  rank, alpha, dropout, rslora, targets
`targets` is a comma-separated list of aliases (TARGET_ALIASES: llm, llm_attention, llm_mlp,
adapter, mergers, encoder_attention, encoder_qkv, encoder_mlp, lm_head) or regexes matched in full
against the '/'-joined module path (e.g. `language_model/layers/self_attn/q_proj`; unrolled
layers are `layers_<i>`, and the aliases match both).

Why a context rather than a constructor argument: the Dense layers are built inside the encoder,
adapter and LLM modules, which do not carry the LoRA config; MossAudioModel makes its config's
LoRA spec current for the duration of every init/apply (`active`), and `Dense` reads it there.
Applying a tree that holds adapters without that spec raises instead of silently ignoring them.

`merge` folds the adapters into the kernels (for export in the reference format) and
`init_adapters` adds fresh adapters to a base tree (fine-tuning a pretrained checkpoint).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
LORA_A, LORA_B = "lora_a", "lora_b"
LORA_LEAVES = (LORA_A, LORA_B)

_L = r"layers(?:_\d+)?"  # a scanned stack or one unrolled layer
TARGET_ALIASES = {
    "llm_attention": rf"language_model/{_L}/self_attn/(?:q|k|v|o)_proj",
    "llm_mlp": rf"language_model/{_L}/mlp/(?:gate|up|down)_proj",
    "llm": rf"language_model/{_L}/(?:self_attn/(?:q|k|v|o)_proj|mlp/(?:gate|up|down)_proj)",
    "adapter": r"audio_adapter/(?:gate|up|down)_proj",
    "mergers": r"deepstack_audio_merger_list_\d+/(?:gate|up|down)_proj",
    "encoder_attention": rf"audio_encoder/{_L}/self_attn/(?:q|k|v|out)_proj",
    "encoder_qkv": rf"audio_encoder/{_L}/self_attn/(?:q|k|v)_proj",
    "encoder_mlp": rf"audio_encoder/{_L}/fc[12]",
    "lm_head": r"lm_head",
}


class LoraError(ValueError):
  """A LoRA config or parameter tree that cannot work (bad pattern, adapters without a spec)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  dropout: float = 0.0
  rslora: bool = False
  targets: tuple[str, ...] = ("llm",)

  def __post_init__(self):
    if self.rank <= 0:
      raise LoraError(f"lora rank must be positive, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise LoraError(f"lora dropout must be in [0, 1), got {self.dropout}")
    if not self.targets:
      raise LoraError("lora targets is empty: name at least one alias or module pattern")
    for t in self.targets:
      try:
        re.compile(TARGET_ALIASES.get(t, t))
      except re.error as e:
        raise LoraError(f"lora target {t!r} is neither an alias ({', '.join(TARGET_ALIASES)}) "
                        f"nor a valid regex: {e}") from None

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @property
  def pattern(self) -> re.Pattern:
    return re.compile("|".join(f"(?:{TARGET_ALIASES.get(t, t)})" for t in self.targets))

  def matches(self, module_path: str) -> bool:
    return self.pattern.fullmatch(module_path) is not None


def spec_from_config(model_config) -> LoraSpec | None:
  """The LoRA spec of config.model (None when there is no `lora` section or rank is 0)."""
  c = model_config.get("lora") if hasattr(model_config, "get") else None
  if c is None or not int(c.get("rank", 0)):
    return None
  targets = c.get("targets", "llm")
  if isinstance(targets, str):
    targets = tuple(t.strip() for t in targets.split(",") if t.strip())
  return LoraSpec(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.get("dropout", 0.0)),
                  rslora=bool(c.get("rslora", False)), targets=tuple(targets))


_ACTIVE: contextvars.ContextVar[LoraSpec | None] = contextvars.ContextVar("lora_spec",
                                                                          default=None)


@contextlib.contextmanager
def active(spec: LoraSpec | None) -> Iterator[None]:
  """Makes `spec` the LoRA spec that Dense layers built and applied inside see."""
  token = _ACTIVE.set(spec)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def a_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """PEFT's A init: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Dense):
  """nn.Dense plus a LoRA branch when the active spec targets this module's path.

  `axes` are the kernel's logical axis names (the adapters take theirs from them). With no spec
  active, or a path the spec does not target, it is exactly nn.Dense (same params, same math).
  """
  axes: tuple[str | None, str | None] = (None, None)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    # One [tokens, in] x [in, out] matmul rather than a dot with leading batch dims: XLA:CPU then
    # gives the backward pass's weight-gradient dots plain layouts instead of writing transposed
    # copies of [tokens, features] activations (the same math; TPU/GPU flatten dots anyway).
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    y = y.reshape(inputs.shape[:-1] + (self.features,))
    spec = _ACTIVE.get()
    path = "/".join(self.scope.path)
    if spec is None or not spec.matches(path):
      if not self.is_initializing() and self.has_variable("params", LORA_A):
        raise LoraError(f"{path} has LoRA adapters but the model config has no LoRA spec "
                        "targeting it: set config.model.lora to what the run trained with")
      return y
    r = spec.rank
    a = self.param(LORA_A, nn.with_logical_partitioning(a_init, (self.axes[0], None)),
                   (inputs.shape[-1], r), self.param_dtype)
    b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        (None, self.axes[1])),
                   (r, self.features), self.param_dtype)
    x = inputs
    if spec.dropout > 0.0 and self.has_rng("dropout"):
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - spec.dropout), jnp.zeros_like(x)).astype(inputs.dtype)
    x, a, b = self.promote_dtype(x, a, b, dtype=self.dtype)
    delta = jnp.matmul(jnp.matmul(x, a), b)
    return y + delta * jnp.asarray(spec.scale, delta.dtype)


# ----------------------------------------------------------------------------- trees

def is_lora_path(path: str) -> bool:
  """True for '/'-joined parameter paths of adapter leaves."""
  return path.rsplit("/", 1)[-1] in LORA_LEAVES


def has_adapters(params: Mapping) -> bool:
  return any(_walk_modules(params, ()))


def _walk_modules(tree: Mapping, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Mapping]]:
  """(path, module dict) of every module holding adapters."""
  if LORA_A in tree or LORA_B in tree:
    yield prefix, tree
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _walk_modules(value, prefix + (name,))


def adapter_modules(params: Mapping) -> list[tuple[str, ...]]:
  """Paths of the modules that carry adapters, in tree order."""
  return [p for p, _ in _walk_modules(params, ())]


def split(params: Mapping) -> tuple[dict, dict]:
  """(base, adapters): the tree without lora_a/lora_b leaves, and only those leaves."""
  base, adapters = {}, {}
  for name, value in params.items():
    if isinstance(value, Mapping):
      b, a = split(value)
      if b:
        base[name] = b
      if a:
        adapters[name] = a
    elif name in LORA_LEAVES:
      adapters[name] = value
    else:
      base[name] = value
  return base, adapters


def merge(params: Mapping, spec: LoraSpec) -> dict:
  """The plain tree with every adapter folded in: kernel + scale * A @ B (float32, then cast back
  to the kernel's dtype). Scanned stacks merge per layer (A [L, in, r], B [L, r, out])."""

  def walk(tree):
    out = {}
    for name, value in tree.items():
      if name in LORA_LEAVES:
        continue
      out[name] = walk(value) if isinstance(value, Mapping) else value
    if LORA_A in tree or LORA_B in tree:
      if not (LORA_A in tree and LORA_B in tree and "kernel" in tree):
        raise LoraError(f"a module has {sorted(k for k in tree if k in LORA_LEAVES)} but needs "
                        "kernel, lora_a and lora_b")
      kernel = tree["kernel"]
      delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(tree[LORA_A], jnp.float32),
                         jnp.asarray(tree[LORA_B], jnp.float32)) * spec.scale
      out["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return out

  return walk(params)


def merged_kernel(module: Mapping, spec: LoraSpec | None) -> jax.Array:
  """A Dense module's kernel with its adapter folded in (kernel + scale * A @ B, differentiable
  in A and B), or the kernel itself when it has none: for code that reads a kernel directly (the
  fused lm_head loss) instead of applying the module."""
  if LORA_A not in module:
    return module["kernel"]
  if spec is None:
    raise LoraError("a kernel has LoRA adapters but the model config has no LoRA spec")
  kernel = module["kernel"]
  delta = jnp.matmul(module[LORA_A].astype(jnp.float32), module[LORA_B].astype(jnp.float32))
  return (kernel.astype(jnp.float32) + spec.scale * delta).astype(kernel.dtype)


def merge_adapters(params: Mapping, model_config) -> dict:
  """`params` with config.model.lora's adapters folded into the kernels (unchanged when the tree
  has none): the tree to export in the reference format, for a model of base_model_config."""
  if not has_adapters(params):
    return dict(params)
  spec = spec_from_config(model_config)
  if spec is None:
    raise LoraError("the parameter tree has LoRA adapters but model.lora.rank is 0: pass the "
                    "config the run trained with")
  return merge(params, spec)


def base_model_config(model_config):
  """A copy of config.model with LoRA switched off (the model a merged tree belongs to)."""
  config = model_config.copy_and_resolve_references()
  if "lora" in config:
    config.lora.rank = 0
  return config


def init_adapters(params: Mapping, abstract: PyTree, rng: jax.Array) -> dict:
  """`params` (a base tree) plus fresh adapters: A as PEFT inits it, B = 0.

  `abstract` is the full tree of the LoRA model as jax.ShapeDtypeStruct (params.abstract_params
  of a config with model.lora on); leaves carrying a sharding are created in it.
  """
  _, adapters_abs = split(abstract)
  if not adapters_abs:
    raise LoraError("config.model.lora targets no dense layer of this model")
  flat, treedef = jax.tree_util.tree_flatten_with_path(adapters_abs)
  shardings = [leaf.sharding for _, leaf in flat]
  out_sh = (jax.tree_util.tree_unflatten(treedef, shardings)
            if all(s is not None for s in shardings) else None)

  def make(key):
    keys = jax.random.split(key, len(flat))
    leaves = []
    for k, (path, leaf) in zip(keys, flat):
      name = path[-1].key
      leaves.append(a_init(k, leaf.shape, leaf.dtype) if name == LORA_A
                    else jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  adapters = jax.jit(make, out_shardings=out_sh)(rng)
  return _union(params, adapters)


def _union(a: Mapping, b: Mapping) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _union(out[k], v) if k in out and isinstance(v, Mapping) else v
  return out
