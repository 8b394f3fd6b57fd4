"""The model on an 8-device CPU mesh: same logits as one device, params laid out by the rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base
from moss_jax import model as M
from moss_jax import sharding

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROWS, LENGTH, CHUNKS, FRAMES = 8, 24, 2, 64
ARGS = ("input_ids", "positions", "segment_ids", "audio_mel", "audio_chunk_frames",
        "audio_token_index")


def mesh_config(shape):
  c = base.mesh_config()
  c.shape = shape
  return c


def small_config():
  cfg = base.model_config("tiny")
  cfg.audio.encoder_layers = 2
  cfg.audio.deepstack_encoder_layer_indexes = (0, 1)
  cfg.text.num_hidden_layers = 3
  return cfg


def random_batch(cfg, seed=0):
  """Each row: 3 text tokens, one chunk's audio tokens, text, then padding (segment 0)."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(9, FRAMES + 1, (ROWS, CHUNKS)).astype(np.int32)
  frames[:, 1] = 0  # the second chunk slot is empty
  ids = rng.integers(1, cfg.text.vocab_size, (ROWS, LENGTH)).astype(np.int32)
  index = np.full((ROWS, LENGTH), -1, np.int32)
  segments = np.zeros((ROWS, LENGTH), np.int32)
  for r in range(ROWS):
    n_audio = -(-frames[r, 0] // 8)
    index[r, 3:3 + n_audio] = np.arange(n_audio)
    segments[r, :3 + n_audio + 4] = 1
  return dict(input_ids=ids, positions=np.tile(np.arange(LENGTH, dtype=np.int32), (ROWS, 1)),
              segment_ids=segments, audio_token_index=index, audio_chunk_frames=frames,
              audio_mel=rng.normal(size=(ROWS, CHUNKS, 128, FRAMES)).astype(np.float32))


@pytest.fixture(scope="module")
def reference():
  cfg = small_config()
  params = M.init_params(cfg, jax.random.key(0))
  batch = random_batch(cfg)
  model = M.MossAudioModel(cfg)
  logits = jax.jit(lambda p, b: model.apply({"params": p}, *(b[k] for k in ARGS)))(params, batch)
  return cfg, params, batch, np.asarray(logits)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2)])
def test_sharded_forward_matches_single_device(shape, reference):
  cfg, params, batch, want = reference
  mesh = sharding.make_mesh(mesh_config(shape))
  shardings = M.param_shardings(cfg, mesh)
  params = jax.device_put(params, shardings)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  model = M.MossAudioModel(cfg)
  with sharding.use_mesh(mesh):
    lowered = jax.jit(lambda p, b: model.apply({"params": p}, *(b[k] for k in ARGS))).lower(
        params, batch)
    logits = lowered.compile()(params, batch)
  assert "sharding_constraint" in lowered.as_text()  # the logical activation constraints are live
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=1e-5)
  # The activation constraint ('batch', 'length', 'vocab') fixed the output layout.
  want_spec = P(("data", "fsdp"), None, "tensor" if shape[2] > 1 else None)
  assert logits.sharding.is_equivalent_to(NamedSharding(mesh, want_spec), 3)


def test_init_params_is_sharded_by_the_rules(reference):
  cfg, want, _, _ = reference
  mesh = sharding.make_mesh(mesh_config((1, 4, 2)))
  params = M.init_params(cfg, jax.random.key(0), mesh)
  q = params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor")  # [layers, embed, heads]
  assert q.addressable_shards[0].data.shape == (3, 128 // 4, 128 // 2)
  emb = params["language_model"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")  # [vocab, embed]
  fc1 = params["audio_encoder"]["layers"]["fc1"]["kernel"]
  assert fc1.sharding.spec == P(None, "fsdp", "tensor")  # [layers, audio_embed, audio_mlp]
  conv = params["audio_encoder"]["conv2"]["kernel"]
  assert conv.sharding.spec == P(None, None, None, None)
  # Same values as the single-device init: the layout does not change the random stream.
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               params, want)


def test_every_param_has_one_logical_name_per_dim(reference):
  cfg = reference[0]
  abstract = M.abstract_params(cfg)
  specs = M.param_logical_axes(cfg)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  assert len(flat_specs) == len(jax.tree.leaves(abstract))
  for spec, leaf in zip(flat_specs, jax.tree.leaves(abstract)):
    assert len(spec) == leaf.ndim
  known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
  used = {name for spec in flat_specs for name in spec if name is not None}
  assert used <= known, used - known


def test_activation_names_resolve_without_conflict():
  """fsdp goes to the batch of an activation and to the embed dim of a weight."""
  rules = sharding.LOGICAL_AXIS_RULES
  import flax.linen as nn
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P(
      ("data", "fsdp"), None, None)
  assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P("fsdp", "tensor")


def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh(mesh_config((2, -1, 1)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  mesh = sharding.make_mesh(mesh_config((1, -1, 2)), devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(mesh_config((3, -1, 1)))
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh(mesh_config((2, 2, 1)))
  with pytest.raises(ValueError, match="more than one -1"):
    sharding.make_mesh(mesh_config((-1, -1, 1)))


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2)])
def test_sharded_gradients_with_the_stems_matmul_backward_match_single_device(shape, reference):
  """The conv stem's custom backward pass (`conv_matmul_bwd`: taps, folds, matmuls) under data,
  FSDP and tensor sharding gives the single-device gradients."""
  cfg, params, batch, _ = reference
  cfg = cfg.copy_and_resolve_references()
  cfg.audio.conv_stem_impl = "conv_matmul_bwd"
  model = M.MossAudioModel(cfg)
  loss = lambda p, b: jnp.mean(jnp.square(model.apply({"params": p}, *(b[k] for k in ARGS))))
  want = jax.jit(jax.grad(loss))(params, batch)
  mesh = sharding.make_mesh(mesh_config(shape))
  sharded_params = jax.device_put(params, M.param_shardings(cfg, mesh))
  sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  with sharding.use_mesh(mesh):
    got = jax.jit(jax.grad(loss))(sharded_params, sharded_batch)
  stem = got["audio_encoder"]["conv2"]["kernel"]
  assert float(jnp.abs(stem).max()) > 0
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6,
                                                       rtol=1e-4), got, want)
