"""Start-up validation of run configs: the presets pass, bad values are all reported at once."""

from __future__ import annotations

import pytest

from configs import pretrain, sft
from moss_jax.config_validation import ConfigError, validate


@pytest.mark.parametrize("module,preset,devices", [
    (pretrain, "demo", 1), (pretrain, "demo", 8), (pretrain, "4b_stage1", 256),
    (pretrain, "8b", 256), (sft, "demo", 8), (sft, "4b", 64)])
def test_presets_are_valid(module, preset, devices):
  config = module.get_config(preset)
  if preset != "demo":
    config.data.train_manifests = "asr.jsonl,caption.jsonl"  # data paths are flags
  validate(config, num_devices=devices, process_count=1, check_paths=(preset == "demo"))


def test_every_problem_is_reported():
  c = pretrain.get_config("demo")
  c.mesh.shape = (2, -1, 2)
  c.model.text.num_attention_heads = 3  # not a multiple of the 2 kv heads, nor of tensor=2
  c.train.grad_accum = 3
  c.optim.schedule = "exponential"
  c.optim.warmup_steps = 10_000
  c.train.init_from = "/no/such/dir"
  c.model.scan_unroll = 0
  c.model.audio.conv_stem_impl = "winograd"
  with pytest.raises(ConfigError) as err:
    validate(c, num_devices=8, process_count=1)
  text = str(err.value)
  for expected in ("num_attention_heads (3) must be a multiple of num_key_value_heads (2)",
                   "model.text.num_attention_heads=3 is not divisible by the tensor axis (2)",
                   "data.batch_size (8) must be divisible by train.grad_accum (3)",
                   "optim.schedule='exponential'", "optim.warmup_steps (10000)",
                   "train.init_from not found: /no/such/dir", "model.scan_unroll=0",
                   "model.audio.conv_stem_impl='winograd'"):
    assert expected in text, (expected, text)
  assert len(err.value.problems) >= 8


def test_mesh_and_process_checks():
  c = pretrain.get_config("demo")
  c.mesh.shape = (1, 3, 1)
  with pytest.raises(ConfigError, match=r"needs 3 devices but 8 are available"):
    validate(c, num_devices=8)
  c.mesh.shape = (1, -1, 1)
  c.data.batch_size = 12
  with pytest.raises(ConfigError, match="divisible by the process count"):
    validate(c, num_devices=4, process_count=8)


@pytest.mark.parametrize("preset", ["4b_stage1", "8b"])
def test_reference_sizes_lower_from_abstract_shapes(preset):
  """The pod-scale step is built and lowered with no data and no allocated parameters."""
  import jax
  from moss_jax import sharding
  from moss_jax import train_step as ts
  c = pretrain.get_config(preset)
  c.data.batch_size = 8
  c.mesh.shape = (1, 4, 2)
  prog = ts.build_program(c, sharding.make_mesh(c.mesh))
  lowered = prog.train_step.lower(prog.abstract_state, prog.abstract_batch)
  assert "stablehlo" in lowered.as_text()[:20000]
  # Stage 1 keeps optimizer moments for the adapter and mergers only.
  moments = sum(x.size for x in jax.tree.leaves(prog.abstract_state["opt_state"]) if x.ndim)
  trainable = sum(x.size for x in jax.tree.leaves(prog.abstract_state["params"]))
  assert moments == 2 * trainable
  if preset == "4b_stage1":
    assert set(prog.abstract_state["params"]) == {"audio_adapter"} | {
        f"deepstack_audio_merger_list_{i}" for i in range(3)}
