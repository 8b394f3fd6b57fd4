"""LoRA: adapters that start as the identity, merge exactly, export to PEFT's format (loaded by
`peft` onto the PyTorch reference), train alone with optimizer state for the adapters only, and
shard like their kernels; per-module learning rates and weight-decay masks.

Run `pytest -s -q tests/test_lora.py` to see the measured differences.
"""

import json
import os
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import torch_reference as tr
from configs import pretrain, sft
from moss_jax import config_validation, hf, optim
from moss_jax import train_step as ts
from moss_jax.hf import mapping
from moss_jax.hf import peft as peft_io
from moss_jax.model import (MossAudioModel, abstract_params, init_params, lora,
                            param_logical_axes)
from moss_jax.sharding import make_mesh

pytestmark = pytest.mark.usefixtures("fast_compiles")
torch.set_num_threads(1)

AUDIO_ID, AUDIO_BOS, AUDIO_EOS = 7, 8, 9
ALL_TARGETS = "llm,adapter,mergers,encoder_attention,encoder_mlp"


def with_lora(model_config, rank=4, alpha=8.0, rslora=False, targets=ALL_TARGETS, dropout=0.0):
  cfg = model_config.copy_and_resolve_references()
  cfg.lora = ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, dropout=dropout,
                                            rslora=rslora, targets=targets))
  return cfg


def randomize_b(params, seed=0, scale=0.1):
  """Non-zero B everywhere (a fixed draw per leaf), so every adapter changes the function."""
  key = jax.random.key(seed)

  def f(path, x):
    if path[-1].key != lora.LORA_B:
      return x
    k = jax.random.fold_in(key, zlib.crc32(optim.path_str(path).encode()) % (2 ** 31))
    return scale * jax.random.normal(k, x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(f, params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch reference, its reference-format dir, our base model and params, inputs)."""
  path = str(tmp_path_factory.mktemp("ref"))
  ref = tr.random_reference_dir(path, AUDIO_ID, AUDIO_BOS, AUDIO_EOS)
  model, params = hf.load_pretrained(path)
  rng = np.random.default_rng(0)
  frames = 300
  n_audio = -(-frames // 8)
  ids = ([int(t) for t in rng.integers(30, 300, 5)] + [AUDIO_BOS] + [AUDIO_ID] * n_audio
         + [AUDIO_EOS] + [int(t) for t in rng.integers(30, 300, 20)])
  ids = np.array([ids], np.int64)
  mel = np.clip(rng.normal(0.0, 0.5, (1, 128, frames)), -1.5, 1.5).astype(np.float32)
  lengths = np.array([frames])
  return ref, path, model, params, (ids, mel, lengths)


def jax_logits(model, params, inputs):
  ids, mel, lengths = inputs
  return np.asarray(hf.reference_logits(model, params, ids, mel, lengths, AUDIO_ID))


def torch_logits(module, inputs):
  ids, mel, lengths = inputs
  with torch.no_grad():
    return module(torch.from_numpy(ids), torch.from_numpy(mel), torch.from_numpy(lengths)).numpy()


@pytest.fixture(scope="module")
def adapted(reference):
  """The reference model with random non-zero adapters on every kind of dense layer."""
  _, _, model, params, inputs = reference
  cfg = with_lora(model.config)
  lora_model = MossAudioModel(cfg)
  full = randomize_b(lora.init_adapters(params, abstract_params(cfg), jax.random.key(1)))
  return lora_model, full, jax_logits(lora_model, full, inputs)


def test_zero_b_gives_the_base_logits_exactly(reference):
  _, _, model, params, inputs = reference
  cfg = with_lora(model.config)
  full = lora.init_adapters(params, abstract_params(cfg), jax.random.key(3))
  modules = lora.adapter_modules(full)
  # 7 LLM and 6 encoder projections per layer stack, 3 adapter, 3 x 3 mergers.
  assert len(modules) == 7 + 6 + 3 + 9
  base = jax_logits(model, params, inputs)
  np.testing.assert_array_equal(jax_logits(MossAudioModel(cfg), full, inputs), base)


def test_unrolled_layers_get_one_adapter_per_layer():
  cfg = with_lora(pretrain.get_config("demo").model)
  cfg.scan_layers = False
  _, adapters = lora.split(abstract_params(cfg))
  assert adapters["language_model"]["layers_3"]["mlp"]["down_proj"]["lora_a"].shape == (384, 4)
  assert len(lora.adapter_modules(adapters)) == (7 + 6) * 4 + 3 + 3 * 2


def test_adapters_stack_on_the_layer_axis_and_shard_like_their_kernels():
  cfg = with_lora(pretrain.get_config("demo").model, rank=8)
  axes = param_logical_axes(cfg)
  q = axes["language_model"]["layers"]["self_attn"]["q_proj"]
  assert tuple(q["kernel"]) == ("layers", "embed", "heads")
  assert tuple(q["lora_a"]) == ("layers", "embed", None)
  assert tuple(q["lora_b"]) == ("layers", None, "heads")
  fc1 = axes["audio_encoder"]["layers"]["fc1"]
  assert tuple(fc1["lora_a"]) == ("layers", "audio_embed", None)
  mesh = make_mesh(ml_collections.ConfigDict({"shape": (1, 4, 2)}))
  abstract = ts.abstract_params_with_shardings(cfg, mesh)
  a = abstract["language_model"]["layers"]["self_attn"]["q_proj"]
  assert a["lora_a"].shape == (4, 128, 8) and a["lora_b"].shape == (4, 8, 128)
  assert a["lora_a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert a["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")


def test_merged_tree_equals_the_lora_forward_and_exports_to_pytorch(reference, adapted, tmp_path):
  ref, _, model, _, inputs = reference
  lora_model, full, want = adapted
  merged = lora.merge_adapters(full, lora_model.config)
  assert not lora.has_adapters(merged)
  base_model = MossAudioModel(lora.base_model_config(lora_model.config))
  assert lora.spec_from_config(base_model.config) is None
  got = jax_logits(model, merged, inputs)
  diff = float(np.abs(got - want).max())
  moved = np.abs(want - jax_logits(model, lora.split(full)[0], inputs)).max()
  print(f"\nmerged vs LoRA forward (float32): max abs diff {diff:.2e}; logit scale "
        f"{np.abs(want).max():.2f}; the adapters moved the logits by up to {moved:.2f}")
  assert diff <= 1e-5
  hf.save_pretrained(str(tmp_path), base_model, merged, dtype=jnp.float32)
  from safetensors.torch import load_file
  with open(tmp_path / "config.json") as f:
    again = tr.TorchMossAudio(json.load(f), audio_token_id=AUDIO_ID)
  again.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
  again.eval()
  torch_diff = float(np.abs(torch_logits(again, inputs) - want).max())
  print(f"merged export in PyTorch vs JAX LoRA: max abs diff {torch_diff:.2e}")
  assert torch_diff <= 1e-4


def test_peft_adapter_loads_onto_the_pytorch_reference(reference, adapted, tmp_path):
  import peft
  ref, path, model, params, inputs = reference
  lora_model, full, want = adapted
  modules = peft_io.save_adapter(str(tmp_path), full, lora_model.config)
  with open(tmp_path / "adapter_config.json") as f:
    cfg = json.load(f)
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == modules
  assert "language_model.layers.3.mlp.down_proj" in modules
  assert "audio_encoder.layers.0.self_attn.out_proj" in modules
  assert "deepstack_audio_merger_list.2.up_proj" in modules
  base = tr.TorchMossAudio(tr.tiny_reference_config(audio_token_id=AUDIO_ID))
  from safetensors.torch import load_file
  base.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path))
  peft_model.eval()
  lora_layers = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")]
  assert len(lora_layers) == len(modules)
  got = torch_logits(peft_model, inputs)
  diff = float(np.abs(got - want).max())
  print(f"\nPEFT adapter on the PyTorch reference vs JAX LoRA: max abs diff {diff:.2e}")
  assert diff <= 1e-4
  # And back: the directory loads into our tree exactly.
  loaded, spec = peft_io.load_adapter(str(tmp_path), params, model.config)
  assert spec.rank == 4 and spec.scale == 2.0
  for path_, leaf in mapping.flatten_leaves(full).items():
    np.testing.assert_array_equal(np.asarray(mapping.get_leaf(loaded, path_)), np.asarray(leaf))
  again = MossAudioModel(with_lora(model.config, **peft_io.lora_config_dict(spec)))
  np.testing.assert_array_equal(jax_logits(again, loaded, inputs), want)


def test_rslora_scale_and_bad_specs():
  assert lora.LoraSpec(64, 2.0).scale == 2.0 / 64
  assert lora.LoraSpec(64, 8.0, rslora=True).scale == 1.0
  with pytest.raises(lora.LoraError, match="neither an alias"):
    lora.LoraSpec(4, 1.0, targets=("q_proj(",))
  config = sft.get_config("lora")
  config.model.lora.targets = "llm,q_prj"
  config.train.stage = "lora"
  with pytest.raises(config_validation.ConfigError, match="'q_prj' matches no dense layer"):
    config_validation.validate(config, 1, check_paths=False)
  config = sft.get_config("full")
  config.train.stage = "lora"
  with pytest.raises(config_validation.ConfigError, match="model.lora.rank is 0"):
    config_validation.validate(config, 1, check_paths=False)


def test_applying_adapters_without_the_spec_is_an_error(reference, adapted):
  _, _, model, _, inputs = reference
  _, full, _ = adapted
  with pytest.raises(lora.LoraError, match="has LoRA adapters but the model config"):
    jax_logits(model, full, inputs)


@pytest.mark.parametrize("preset,stage", [("lora", "lora"), ("full", "full"),
                                          ("encoder_frozen", "encoder_frozen"),
                                          ("4b_lora", "lora"), ("8b_full", "full")])
def test_sft_presets_validate(preset, stage):
  config = sft.get_config(preset)
  assert config.train.stage == stage
  assert (lora.spec_from_config(config.model) is not None) == (stage == "lora")
  config.data.train_manifests = config.data.train_manifests or "chat.jsonl"
  config_validation.validate(config, 8, check_paths=False)


def small_config(stage="lora", **optim_kw):
  config = sft.get_config("lora")
  config.model.lora.update(rank=4, alpha=4.0, rslora=False)
  config.train.stage = stage
  config.data.update(batch_size=2, max_tokens=64, max_audio_chunks=1)
  config.optim.update(**optim_kw)
  return config


def test_optimizer_state_exists_only_for_adapters():
  config = small_config(weight_decay=0.1)
  config.train.frozen_dtype = "bfloat16"
  optimizer = optim.make_optimizer(config.optim)
  params = init_params(config.model, jax.random.key(0))
  state = ts.create_state(params, optimizer, "lora", frozen_dtype="bfloat16")
  trainable = mapping.flatten_leaves(state["params"])
  assert trainable and all(k[-1] in lora.LORA_LEAVES for k in trainable)
  frozen = mapping.flatten_leaves(state["frozen"])
  assert not any(k[-1] in lora.LORA_LEAVES for k in frozen)
  assert all(v.dtype == jnp.bfloat16 for v in frozen.values())  # the base, stored once in bf16
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  n_adapter = sum(x.size for x in trainable.values())
  assert sum(x.size for x in moments) == 2 * n_adapter  # mu and nu of the adapters, nothing else


def test_a_lora_train_step_changes_only_adapters():
  config = small_config()
  config.model.lora.dropout = 0.1
  model = MossAudioModel(config.model)
  optimizer = optim.make_optimizer(config.optim)
  schedule = optim.make_schedule(config.optim, config.train.steps)
  forward = jax.jit(ts.make_forward(model, config.model))
  step = jax.jit(ts.make_train_step(ts.make_stats_fn(model, config.model), optimizer, schedule,
                                    dropout_seed=ts.dropout_seed(config)))
  params = init_params(config.model, jax.random.key(0))
  state = ts.create_state(params, optimizer, "lora")
  batch = ts.synthetic_batch(config, 0)
  new, metrics = step(state, batch)
  assert int(metrics["finite"]) == 1
  jax.tree.map(np.testing.assert_array_equal, new["frozen"], state["frozen"])
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         new["params"], state["params"])
  b_changed = [v for k, v in mapping.flatten_leaves(changed).items() if k[-1] == lora.LORA_B]
  assert all(b_changed)  # every B moved off zero
  # Dropout: training forward differs from the deterministic one, and is reproducible.
  p = ts.full_params(new)
  det = np.asarray(forward(p, batch))
  d1 = np.asarray(forward(p, batch, jax.random.key(5)))
  assert np.abs(d1 - det).max() > 0
  np.testing.assert_array_equal(d1, np.asarray(forward(p, batch, jax.random.key(5))))


def test_module_lr_multipliers_and_decay_mask():
  params = {
      "audio_encoder": {"layers": {"fc1": {"kernel": jnp.ones((2, 3, 3)), "bias": jnp.ones((2, 3))},
                                   "final_layer_norm": {"scale": jnp.ones((2, 3))}}},
      "audio_adapter": {"up_proj": {"kernel": jnp.ones((3, 3))}},
      "deepstack_audio_merger_list_0": {"up_proj": {"kernel": jnp.ones((3, 3))}},
      "language_model": {"embed_tokens": {"embedding": jnp.ones((5, 3))},
                         "layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 3, 3)),
                                                        "lora_a": jnp.ones((2, 3, 1))}}}},
      "lm_head": {"kernel": jnp.ones((3, 5))},
  }
  groups = {optim.path_str(p): optim.module_group(optim.path_str(p))
            for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert groups["language_model/layers/mlp/up_proj/lora_a"] == "lora"
  assert groups["deepstack_audio_merger_list_0/up_proj/kernel"] == "adapter"
  assert groups["lm_head/kernel"] == "llm" and groups["audio_encoder/layers/fc1/bias"] == "encoder"
  oc = pretrain.get_config("demo").optim
  oc.update(clip_norm=0.0, weight_decay=0.5, no_decay="embedding")
  oc.lr_multipliers.update(encoder=0.0, adapter=2.0, lora=10.0)
  tx = optim.make_optimizer(oc)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)  # zero grads: the update is weight decay alone
  upd, _ = tx.update(grads, state, params)
  flat = {optim.path_str(p): np.asarray(u) for p, u in jax.tree_util.tree_flatten_with_path(upd)[0]}
  assert (flat["audio_encoder/layers/fc1/kernel"] == 0).all()  # encoder multiplier 0
  assert (flat["audio_adapter/up_proj/kernel"] == 1.0).all()  # 0.5 decay x 2
  assert (flat["language_model/layers/mlp/up_proj/kernel"] == 0.5).all()
  assert (flat["language_model/layers/mlp/up_proj/lora_a"] == 5.0).all()
  assert (flat["language_model/embed_tokens/embedding"] == 0).all()  # no_decay
  assert (flat["audio_encoder/layers/final_layer_norm/scale"] == 0).all()
  assert (flat["lm_head/kernel"] == 0.5).all()
  # Stateless: the multipliers add no optimizer state.
  plain = pretrain.get_config("demo").optim
  assert (len(jax.tree.leaves(optim.make_optimizer(plain).init(params)))
          == len(jax.tree.leaves(state)))


def test_the_fused_loss_sees_an_lm_head_adapter():
  """The loss applies lm_head's kernel itself (vocabulary blocks): an adapter there enters it."""
  config = small_config()
  config.model.lora.targets = "lm_head,llm_attention"
  model = MossAudioModel(config.model)
  params = randomize_b(init_params(config.model, jax.random.key(0)), scale=0.5)
  assert lora.LORA_B in params["lm_head"]
  batch = ts.synthetic_batch(config, 1)
  fused = jax.jit(ts.make_stats_fn(model, config.model))(params, batch)
  logits = jax.jit(ts.make_forward(model, config.model))(params, batch)
  plain = ts.token_stats(logits, batch["labels"], batch["task_ids"])
  np.testing.assert_allclose(float(fused["ce_sum"]), float(plain["ce_sum"]), rtol=1e-5)
  base = dict(params, lm_head={"kernel": params["lm_head"]["kernel"]})
  cfg = config.model.copy_and_resolve_references()
  cfg.lora.targets = "llm_attention"
  without = jax.jit(ts.make_stats_fn(MossAudioModel(cfg), cfg))(base, batch)
  assert abs(float(without["ce_sum"]) - float(fused["ce_sum"])) > 1e-3
