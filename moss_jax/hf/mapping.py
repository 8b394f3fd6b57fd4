"""The one table mapping Flax parameter paths to reference (PyTorch) checkpoint names.

Every tensor of the reference checkpoint (spec 6.1) is one `Rule`: a Flax path template, an HF
key template, a layout transform and the torch-layout shape written with config symbols. The
rules are expanded against a model config into `Entry`s, one per HF tensor, so export and import
can walk the checkpoint one tensor at a time (streaming from an Orbax checkpoint or into a
sharded safetensors file) without ever materialising a second copy of the model.

Layer stacks: `{layers}` in a Flax template is `layers` with the layer index on axis 0 when the
tree is scanned, or `layers_{i}` when unrolled; `{i}` in an HF template is the layer (or merger)
index. Nothing outside this file knows a parameter name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from moss_jax.batch import DOWNSAMPLE
from moss_jax.model_config import num_mergers

# Layout transforms between Flax and torch.
COPY = "copy"  # biases, norm scales, embeddings: same layout
LINEAR = "linear"  # Flax Dense kernel [in, out] <-> torch Linear weight [out, in]
CONV = "conv"  # Flax Conv kernel HWIO [3, 3, in, out] <-> torch Conv2d weight OIHW [out, in, 3, 3]

# Repeat groups: how many copies of a rule exist and whether they can be stacked (scanned).
ENCODER_LAYERS = "encoder_layers"
LLM_LAYERS = "llm_layers"
MERGERS = "mergers"


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: str  # "audio_encoder/{layers}/fc1/kernel"
  hf: str  # "audio_encoder.layers.{i}.fc1.weight"
  transform: str
  shape: tuple[Any, ...]  # torch-layout shape: ints or config symbols (see SYMBOLS)
  group: str | None = None


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor: where it lives in the Flax tree and its torch-layout shape."""
  hf_key: str
  flax_path: tuple[str, ...]
  stack_index: int | None  # layer index on axis 0 of a scanned leaf; None if not stacked
  transform: str
  hf_shape: tuple[int, ...]

  @property
  def flax_shape(self) -> tuple[int, ...]:
    """Shape of this tensor's slice in the Flax tree (without the scan axis)."""
    return flax_shape(self.transform, self.hf_shape)


# Config symbols used in rule shapes.
SYMBOLS: dict[str, Callable[[Any], int]] = {
    "D": lambda c: c.audio.d_model,
    "F": lambda c: c.audio.encoder_ffn_dim,
    "C": lambda c: c.audio.downsample_hidden_size,
    "S": lambda c: c.audio.downsample_hidden_size * (c.audio.num_mel_bins // DOWNSAMPLE),  # c*16+f
    "A": lambda c: c.adapter_hidden_size,
    "H": lambda c: c.text.hidden_size,
    "I": lambda c: c.text.intermediate_size,
    "V": lambda c: c.text.vocab_size,
    "Q": lambda c: c.text.num_attention_heads * c.text.head_dim,
    "K": lambda c: c.text.num_key_value_heads * c.text.head_dim,
    "Hd": lambda c: c.text.head_dim,
}

GROUP_SIZES: dict[str, Callable[[Any], int]] = {
    ENCODER_LAYERS: lambda c: c.audio.encoder_layers,
    LLM_LAYERS: lambda c: c.text.num_hidden_layers,
    MERGERS: num_mergers,
}


def _gated_mlp(flax_prefix: str, hf_prefix: str, group: str | None) -> list[Rule]:
  return [Rule(f"{flax_prefix}/{proj}/kernel", f"{hf_prefix}.{proj}.weight", LINEAR, shape, group)
          for proj, shape in (("gate_proj", ("A", "D")), ("up_proj", ("A", "D")),
                              ("down_proj", ("H", "A")))]


def _encoder_rules() -> list[Rule]:
  rules = []
  for n, cin in (("conv1", 1), ("conv2", "C"), ("conv3", "C")):
    rules += [
        Rule(f"audio_encoder/{n}/kernel", f"audio_encoder.{n}.weight", CONV, ("C", cin, 3, 3)),
        Rule(f"audio_encoder/{n}/bias", f"audio_encoder.{n}.bias", COPY, ("C",))]
  rules += [
      Rule("audio_encoder/stem_proj/kernel", "audio_encoder.stem_proj.weight", LINEAR, ("D", "S")),
      Rule("audio_encoder/stem_proj/bias", "audio_encoder.stem_proj.bias", COPY, ("D",))]
  f, h, g = "audio_encoder/{layers}", "audio_encoder.layers.{i}", ENCODER_LAYERS
  for ln in ("self_attn_layer_norm", "final_layer_norm"):
    rules += [Rule(f"{f}/{ln}/scale", f"{h}.{ln}.weight", COPY, ("D",), g),
              Rule(f"{f}/{ln}/bias", f"{h}.{ln}.bias", COPY, ("D",), g)]
  for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
    a, b = f"{f}/self_attn/{proj}", f"{h}.self_attn.{proj}"
    rules.append(Rule(f"{a}/kernel", f"{b}.weight", LINEAR, ("D", "D"), g))
    if proj != "k_proj":  # Whisper's k_proj has no bias (spec 2.3)
      rules.append(Rule(f"{a}/bias", f"{b}.bias", COPY, ("D",), g))
  rules += [Rule(f"{f}/fc1/kernel", f"{h}.fc1.weight", LINEAR, ("F", "D"), g),
            Rule(f"{f}/fc1/bias", f"{h}.fc1.bias", COPY, ("F",), g),
            Rule(f"{f}/fc2/kernel", f"{h}.fc2.weight", LINEAR, ("D", "F"), g),
            Rule(f"{f}/fc2/bias", f"{h}.fc2.bias", COPY, ("D",), g),
            Rule("audio_encoder/layer_norm/scale", "audio_encoder.layer_norm.weight", COPY, ("D",)),
            Rule("audio_encoder/layer_norm/bias", "audio_encoder.layer_norm.bias", COPY, ("D",))]
  return rules


def _llm_rules() -> list[Rule]:
  f, h, g = "language_model/{layers}", "language_model.layers.{i}", LLM_LAYERS
  rules = [Rule("language_model/embed_tokens/embedding", "language_model.embed_tokens.weight",
                COPY, ("V", "H"))]
  rules.append(Rule(f"{f}/input_layernorm/scale", f"{h}.input_layernorm.weight", COPY, ("H",), g))
  for proj, shape in (("q_proj", ("Q", "H")), ("k_proj", ("K", "H")), ("v_proj", ("K", "H")),
                      ("o_proj", ("H", "Q"))):
    rules.append(Rule(f"{f}/self_attn/{proj}/kernel", f"{h}.self_attn.{proj}.weight", LINEAR,
                      shape, g))
  rules += [Rule(f"{f}/self_attn/q_norm/scale", f"{h}.self_attn.q_norm.weight", COPY, ("Hd",), g),
            Rule(f"{f}/self_attn/k_norm/scale", f"{h}.self_attn.k_norm.weight", COPY, ("Hd",), g),
            Rule(f"{f}/post_attention_layernorm/scale", f"{h}.post_attention_layernorm.weight",
                 COPY, ("H",), g)]
  for proj, shape in (("gate_proj", ("I", "H")), ("up_proj", ("I", "H")),
                      ("down_proj", ("H", "I"))):
    rules.append(Rule(f"{f}/mlp/{proj}/kernel", f"{h}.mlp.{proj}.weight", LINEAR, shape, g))
  rules.append(Rule("language_model/norm/scale", "language_model.norm.weight", COPY, ("H",)))
  return rules


RULES: tuple[Rule, ...] = tuple(
    _encoder_rules()
    + _gated_mlp("audio_adapter", "audio_adapter", None)
    + _gated_mlp("deepstack_audio_merger_list_{i}", "deepstack_audio_merger_list.{i}", MERGERS)
    + _llm_rules()
    + [Rule("lm_head/kernel", "lm_head.weight", LINEAR, ("V", "H"))])

# A plain Qwen3 causal-LM checkpoint names the LLM `model.*` instead of `language_model.*`.
QWEN3_PREFIXES = (("language_model.", "model."),)
LLM_PARTS = ("language_model", "lm_head")


def flax_shape(transform: str, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
  if transform == LINEAR:
    return (hf_shape[1], hf_shape[0])
  if transform == CONV:
    o, i, kh, kw = hf_shape
    return (kh, kw, i, o)
  return tuple(hf_shape)


def to_hf(transform: str, x: np.ndarray) -> np.ndarray:
  """Flax layout -> torch layout (a transposed view; callers make it contiguous when writing)."""
  if transform == LINEAR:
    return x.T
  if transform == CONV:
    return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  return x


def from_hf(transform: str, x: np.ndarray) -> np.ndarray:
  """Torch layout -> Flax layout."""
  if transform == LINEAR:
    return x.T
  if transform == CONV:
    return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return x


def entries(model_config, scan_layers: bool | None = None, parts: tuple[str, ...] | None = None
            ) -> list[Entry]:
  """Every HF tensor of a model with this config, in reference manifest order.

  `parts` keeps only rules under those top-level Flax names (e.g. LLM_PARTS), so a config with
  just a `text` section suffices for the LLM.
  """
  scan = model_config.scan_layers if scan_layers is None else scan_layers
  out = []
  for rule in RULES:
    if parts is not None and rule.flax.split("/")[0].split("_{")[0] not in parts:
      continue
    shape = tuple(SYMBOLS[s](model_config) if isinstance(s, str) else s for s in rule.shape)
    if rule.group is None:
      out.append(Entry(rule.hf, tuple(rule.flax.split("/")), None, rule.transform, shape))
      continue
    stacked = scan and rule.group != MERGERS
    for i in range(GROUP_SIZES[rule.group](model_config)):
      path = rule.flax.format(layers="layers" if stacked else f"layers_{i}", i=i)
      out.append(Entry(rule.hf.format(i=i), tuple(path.split("/")), i if stacked else None,
                       rule.transform, shape))
  return out


def hf_manifest(model_config) -> dict[str, tuple[int, ...]]:
  """{HF name: torch-layout shape} for a config, e.g. the 901 tensors of the 4B model."""
  return {e.hf_key: e.hf_shape for e in entries(model_config)}


def flax_shapes(model_config, scan_layers: bool | None = None
                ) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{Flax path: leaf shape} the table expects (scanned leaves carry the layer count on axis 0)."""
  shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
  counts: dict[tuple[str, ...], int] = {}
  for e in entries(model_config, scan_layers):
    if e.stack_index is None:
      shapes[e.flax_path] = e.flax_shape
    else:
      counts[e.flax_path] = counts.get(e.flax_path, 0) + 1
      shapes[e.flax_path] = (counts[e.flax_path],) + e.flax_shape
  return shapes


def tree_is_scanned(params: Mapping) -> bool:
  """True when the tree stacks layers under `layers` (scanned), False for `layers_{i}`."""
  return "layers" in params.get("language_model", params.get("audio_encoder", {}))


def get_leaf(params: Mapping, path: tuple[str, ...]):
  node = params
  for name in path:
    node = node[name]
  return node


def set_leaf(params: dict, path: tuple[str, ...], value) -> None:
  node = params
  for name in path[:-1]:
    node = node.setdefault(name, {})
  node[path[-1]] = value


def flatten_leaves(params: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """{path tuple: leaf} of a nested dict tree."""
  out = {}
  for name, value in params.items():
    if isinstance(value, Mapping):
      out.update(flatten_leaves(value, prefix + (name,)))
    else:
      out[prefix + (name,)] = value
  return out


def export_tensor(params: Mapping, entry: Entry) -> np.ndarray:
  """One HF tensor (torch layout, host memory) out of a Flax tree: slices scanned leaves."""
  leaf = get_leaf(params, entry.flax_path)
  if entry.stack_index is not None:
    leaf = leaf[entry.stack_index]
  return np.ascontiguousarray(to_hf(entry.transform, np.asarray(leaf)))


def rename_for_qwen3(hf_key: str) -> str:
  """The name of an LLM tensor in a plain Qwen3ForCausalLM checkpoint."""
  for ours, theirs in QWEN3_PREFIXES:
    if hf_key.startswith(ours):
      return theirs + hf_key[len(ours):]
  return hf_key


def iter_export(params: Mapping, model_config) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, torch-layout array) pairs, one tensor at a time, for streaming writers."""
  for entry in entries(model_config, tree_is_scanned(params)):
    yield entry.hf_key, export_tensor(params, entry)
