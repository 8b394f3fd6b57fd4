"""MossAudioModel behaviour on tiny configs: shapes, scan == unrolled, packing, padding, DeepStack,
remat, and numerical parity of the encoder and the Qwen3 LLM with transformers' torch modules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from moss_jax import model as M

pytestmark = pytest.mark.usefixtures("fast_compiles")

F = 64  # mel frames per chunk slot in these tests
T = F // 8  # encoder tokens per chunk slot


def tiny_config(**overrides):
  """configs.base tiny model with 3 DeepStack taps (LLM layer 3 is not injected)."""
  cfg = base.model_config("tiny")
  cfg.audio.deepstack_encoder_layer_indexes = (0, 2, 3)
  cfg.deepstack_num_inject_layers = 3
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return cfg


def make_sample(rng, n_before, chunk_frames, n_after, vocab):
  """One sample: text, the audio placeholders of its chunks (ceil(frames/8) each), more text."""
  local = [c * T + t for c, fr in enumerate(chunk_frames) for t in range(math.ceil(fr / 8))]
  n = n_before + len(local) + n_after
  mel = rng.normal(size=(len(chunk_frames), 128, F)).astype(np.float32)
  for c, fr in enumerate(chunk_frames):
    mel[c, :, fr:] = 0.0  # the reference zero-pads a short chunk
  return dict(ids=rng.integers(1, vocab, n).astype(np.int32),
              local=np.array([-1] * n_before + local + [-1] * n_after, np.int32),
              frames=np.array(chunk_frames, np.int32), mel=mel)


def pack(samples, length, chunks):
  """Packs samples into one row: segments 1..n, positions from 0, chunk slots in order."""
  row = dict(input_ids=np.zeros(length, np.int32), positions=np.zeros(length, np.int32),
             segment_ids=np.zeros(length, np.int32),
             audio_token_index=np.full(length, -1, np.int32),
             audio_mel=np.zeros((chunks, 128, F), np.float32),
             audio_chunk_frames=np.zeros(chunks, np.int32))
  off = slot = 0
  for seg, s in enumerate(samples, start=1):
    n, k = len(s["ids"]), len(s["frames"])
    row["input_ids"][off:off + n] = s["ids"]
    row["positions"][off:off + n] = np.arange(n)
    row["segment_ids"][off:off + n] = seg
    row["audio_token_index"][off:off + n] = np.where(s["local"] >= 0, s["local"] + slot * T, -1)
    row["audio_mel"][slot:slot + k] = s["mel"]
    row["audio_chunk_frames"][slot:slot + k] = s["frames"]
    off, slot = off + n, slot + k
  return row


def stack_rows(rows):
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


ARGS = ("input_ids", "positions", "segment_ids", "audio_mel", "audio_chunk_frames",
        "audio_token_index")


def forward_fn(cfg):
  model = M.MossAudioModel(cfg)
  return jax.jit(lambda p, b: model.apply({"params": p}, *(b[k] for k in ARGS)))


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  params = M.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  vocab = cfg.text.vocab_size
  a = make_sample(rng, 3, [64, 30], 5, vocab)  # 8 + 4 audio tokens
  b = make_sample(rng, 2, [50], 4, vocab)  # 7 audio tokens
  batch = stack_rows([pack([a, b], 40, 3), pack([a], 40, 3), pack([b], 40, 3)])
  return cfg, params, forward_fn(cfg), batch, (a, b)


@pytest.fixture(scope="module")
def encoded(setup):
  """encode_audio of the fixture batch: (adapter_out [B, C*T', H], merger_outs [K, B, C*T', H])."""
  cfg, params, _, batch, _ = setup
  fn = jax.jit(lambda p, mel, frames: M.MossAudioModel(cfg).apply(
      {"params": p}, mel, frames, method=M.MossAudioModel.encode_audio))
  return fn(params, batch["audio_mel"], batch["audio_chunk_frames"])


def test_shapes_and_finite(setup, encoded):
  cfg, params, fwd, batch, _ = setup
  logits = fwd(params, batch)
  assert logits.shape == (3, 40, cfg.text.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  adapter_out, merger_outs = encoded
  assert adapter_out.shape == (3, 3 * T, cfg.text.hidden_size)
  assert merger_outs.shape == (3, 3, 3 * T, cfg.text.hidden_size)
  assert sorted(k for k in params if k.startswith("deepstack")) == [
      f"deepstack_audio_merger_list_{k}" for k in range(3)]


def test_scanned_equals_unrolled(setup):
  cfg, params, fwd, batch, _ = setup
  unrolled = M.unstack_layers(params)
  assert "layers_3" in unrolled["language_model"] and "layers" not in unrolled["audio_encoder"]
  restacked = M.stack_layers(unrolled)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)
  cfg_u = tiny_config(scan_layers=False)
  got = forward_fn(cfg_u)(unrolled, batch)
  np.testing.assert_allclose(got, fwd(params, batch), atol=1e-5, rtol=1e-5)


def test_packed_row_equals_separate_rows(setup):
  _, params, fwd, batch, (a, b) = setup
  logits = np.asarray(fwd(params, batch))
  na, nb = len(a["ids"]), len(b["ids"])
  np.testing.assert_allclose(logits[0, :na], logits[1, :na], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits[0, na:na + nb], logits[2, :nb], atol=1e-5, rtol=1e-5)


def test_padding_is_finite_and_inert(setup):
  _, params, fwd, batch, _ = setup
  base_logits = np.asarray(fwd(params, batch))
  # Garbage in the empty chunk slots (frames = 0) must not reach any logit.
  noisy = dict(batch)
  empty = (batch["audio_chunk_frames"] == 0)[:, :, None, None]
  noisy["audio_mel"] = jnp.where(empty, 1e3, batch["audio_mel"])
  np.testing.assert_allclose(fwd(params, noisy), base_logits, atol=1e-5, rtol=1e-5)
  # A row of pure padding (segment 0, no audio at all) stays finite.
  pad = {k: jnp.zeros_like(v) for k, v in batch.items()}
  pad["audio_token_index"] = jnp.full_like(batch["audio_token_index"], -1)
  assert np.isfinite(np.asarray(fwd(params, pad))).all()


def test_deepstack_only_from_first_audio_position(setup):
  _, params, fwd, batch, (a, _) = setup
  zeroed = dict(params)
  for k in range(3):
    zeroed[f"deepstack_audio_merger_list_{k}"] = jax.tree.map(
        jnp.zeros_like, params[f"deepstack_audio_merger_list_{k}"])
  diff = np.abs(np.asarray(fwd(params, batch)) - np.asarray(fwd(zeroed, batch))).max(-1)
  first = int(np.argmax(a["local"] >= 0))
  assert first == 3
  np.testing.assert_array_equal(diff[1, :first], 0.0)  # causal: text before the audio untouched
  assert (diff[1, first:len(a["ids"])] > 1e-6).all()


REMAT_SMALL = {"audio.encoder_layers": 2, "text.num_hidden_layers": 2,
               "audio.deepstack_encoder_layer_indexes": (0,)}


def _loss_and_grad(policy, params, batch):
  model = M.MossAudioModel(tiny_config(remat_policy=policy, **REMAT_SMALL))
  loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, *(batch[k] for k in ARGS))))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def remat_reference():
  params = M.init_params(tiny_config(**REMAT_SMALL), jax.random.key(1))
  rng = np.random.default_rng(1)
  batch = stack_rows([pack([make_sample(rng, 2, [40], 3, 512)], 16, 1)])
  return params, batch, _loss_and_grad("none", params, batch)


@pytest.mark.parametrize("policy", [
    "dots_no_batch", pytest.param("full", marks=pytest.mark.slow),
    pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_policies_match(policy, remat_reference):
  """Loss and gradients (where remat matters) are those of the no-remat model."""
  params, batch, (l0, g0) = remat_reference
  l1, g1 = _loss_and_grad(policy, params, batch)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), g1, g0)


def test_bf16_layer_scan_saves_only_input_bits():
  """Under remat=full a bfloat16 LLM scan keeps one thing per layer for the backward pass: the
  layer's input, as uint16 bits (a bfloat16 stack costs a float32 copy on XLA:CPU); the
  gradients are bit-for-bit those of the model without remat."""
  from moss_jax.model import llm
  cfg = tiny_config().text
  b, length = 2, 16
  x = jax.random.normal(jax.random.key(0), (b, length, cfg.hidden_size), jnp.bfloat16)
  pos = jnp.tile(jnp.arange(length)[None], (b, 1))
  seg = jnp.ones((b, length), jnp.int32)

  def loss_of(policy):
    model = llm.Qwen3Model(cfg, dtype=jnp.bfloat16, remat_policy=policy)
    return lambda p, x: jnp.sum(jnp.square(
        model.apply({"params": p}, x, pos, seg).astype(jnp.float32)))

  params = llm.Qwen3Model(cfg, dtype=jnp.bfloat16).init(jax.random.key(1), x, pos, seg)["params"]
  _, vjp = jax.vjp(loss_of("full"), params, x)
  stacked = [(a.dtype, a.shape) for a in jax.tree.leaves(vjp) if a.ndim == 4]
  assert stacked == [(jnp.uint16, (cfg.num_hidden_layers, b, length, cfg.hidden_size))]
  g_full, g_none = (jax.jit(jax.grad(loss_of(p), argnums=(0, 1)))(params, x)
                    for p in ("full", "none"))
  jax.tree.map(np.testing.assert_array_equal, g_full, g_none)


def test_conv_stem_implementations_agree(remat_reference):
  """The stem with the matmul backward pass (auto on CPU from 32 channels) computes the lax.conv
  stem: same parameters, same loss, gradients equal up to float32 summation order; both resolve
  as documented."""
  from moss_jax.model import encoder
  params, batch, _ = remat_reference

  def loss_and_grad(impl):
    model = M.MossAudioModel(tiny_config(**{"audio.conv_stem_impl": impl}, **REMAT_SMALL))
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, *(batch[k] for k in ARGS))))
    return jax.jit(jax.value_and_grad(loss))(params)

  l_conv, g_conv = loss_and_grad("conv")
  l_mm, g_mm = loss_and_grad("conv_matmul_bwd")
  np.testing.assert_array_equal(l_mm, l_conv)  # the forward pass is the same lax.conv
  stem = lambda g: {k: v for k, v in g["audio_encoder"].items() if k.startswith("conv")}
  assert stem(g_conv) and all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(stem(g_conv)))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g_mm, g_conv)
  cfg = tiny_config().audio
  assert encoder.stem_impl(cfg) == "conv_matmul_bwd"  # 32 channels on the CPU backend
  cfg.downsample_hidden_size = 16
  assert encoder.stem_impl(cfg) == "conv"
  cfg.conv_stem_impl = "fft"
  with pytest.raises(ValueError, match="conv_stem_impl"):
    encoder.stem_impl(cfg)


@pytest.mark.parametrize("shape", [(2, 8, 10, 3), (1, 7, 9, 2), (3, 5, 4, 1)])
def test_stride2_conv_matmul_backward_matches_autodiff(shape):
  """Input and kernel gradients of the matmul backward pass equal lax.conv's autodiff gradients,
  for even and odd heights/widths (the last input row/column of an odd size is read by one tap
  only) and a single input channel (the stem's first convolution)."""
  from moss_jax.model import encoder
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1], 5)), jnp.float32)
  y_ref, vjp_ref = jax.vjp(encoder._conv3x3_stride2, x, kernel)
  y, vjp = jax.vjp(encoder.conv3x3_stride2_matmul_bwd, x, kernel)
  np.testing.assert_array_equal(y, y_ref)
  assert y.shape == (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), 5)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_remat_policy_is_rejected():
  with pytest.raises(ValueError, match="remat_policy"):
    M.abstract_params(tiny_config(remat_policy="sometimes"))


@pytest.mark.parametrize("frames,same", [(127, True), (123, False)])
def test_tail_chunk_padding_effect(setup, frames, same):
  """Spec 2.4.7: zero-padding a short chunk to 400 frames is exact iff frames % 8 is 0 or 7."""
  cfg, params, _, _, _ = setup
  params = jax.tree_util.tree_map_with_path(  # fresh init has zero biases, which hide the effect
      lambda path, x: x + 0.1 if "bias" in jax.tree_util.keystr(path) else x, params)
  enc = jax.jit(lambda p, x, f: M.MossAudioModel(cfg).apply(
      {"params": p}, x, f, method=lambda m, x, f: m.audio_encoder(x, f)[0]))
  mel = np.random.default_rng(2).normal(size=(1, 1, 128, frames)).astype(np.float32)
  padded = np.zeros((1, 1, 128, 400), np.float32)
  padded[..., :frames] = mel
  n = -(-frames // 8)
  f = jnp.array([[frames]], jnp.int32)
  diff = np.abs(np.asarray(enc(params, mel, f)) - np.asarray(enc(params, padded, f))[:, :n])
  if same:
    assert diff.max() < 1e-5
  else:
    assert diff[0, -1].max() > 1e-2  # the last token reads past the valid end


# ---------------------------------------------------------------- parity with transformers (torch)


def _t(x):
  import torch
  return torch.from_numpy(np.array(x, dtype=np.float32))


def test_encoder_matches_torch_whisper_layers(setup):
  """Conv stem (NCHW, c*16+f flatten), per-chunk positions, key masks, taps, final LN."""
  torch = pytest.importorskip("torch")
  from transformers import WhisperConfig
  from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer, sinusoids
  cfg, params, _, batch, _ = setup
  acfg, enc = cfg.audio, M.unstack_layers(params)["audio_encoder"]
  mel, frames = batch["audio_mel"][:1], batch["audio_chunk_frames"][:1]
  final, taps = jax.jit(lambda p, x, f: M.MossAudioModel(cfg).apply(
      {"params": p}, x, f, method=lambda m, x, f: m.audio_encoder(x, f)))(params, mel, frames)

  x = _t(mel[0])[:, None]  # [C, 1, 128, F]
  for i in (1, 2, 3):
    w = _t(enc[f"conv{i}"]["kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
    x = torch.nn.functional.gelu(torch.nn.functional.conv2d(
        x, w, _t(enc[f"conv{i}"]["bias"]), stride=2, padding=1))
  x = x.permute(0, 3, 1, 2).flatten(2)  # [C, T, ch, 16] -> [C, T, ch*16]
  x = x @ _t(enc["stem_proj"]["kernel"]) + _t(enc["stem_proj"]["bias"])
  x = x + sinusoids(T, acfg.d_model)
  valid = torch.arange(T)[None] < torch.from_numpy(-(-np.asarray(frames[0]) // 8))[:, None]
  mask = ((~valid).float() * torch.finfo(torch.float32).min)[:, None, None, :]
  wcfg = WhisperConfig(d_model=acfg.d_model, encoder_attention_heads=acfg.encoder_attention_heads,
                       encoder_ffn_dim=acfg.encoder_ffn_dim, activation_function="gelu",
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
  wcfg._attn_implementation = "eager"
  ref_taps = []
  for i in range(acfg.encoder_layers):
    layer = WhisperEncoderLayer(wcfg).eval()
    p = enc[f"layers_{i}"]
    sd = {"self_attn_layer_norm.weight": p["self_attn_layer_norm"]["scale"],
          "self_attn_layer_norm.bias": p["self_attn_layer_norm"]["bias"],
          "final_layer_norm.weight": p["final_layer_norm"]["scale"],
          "final_layer_norm.bias": p["final_layer_norm"]["bias"]}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      sd[f"self_attn.{name}.weight"] = np.asarray(p["self_attn"][name]["kernel"]).T
      if "bias" in p["self_attn"][name]:
        sd[f"self_attn.{name}.bias"] = p["self_attn"][name]["bias"]
    for name in ("fc1", "fc2"):
      sd[f"{name}.weight"] = np.asarray(p[name]["kernel"]).T
      sd[f"{name}.bias"] = p[name]["bias"]
    layer.load_state_dict({k: _t(v) for k, v in sd.items()})
    with torch.no_grad():
      x = layer(x, attention_mask=mask, layer_head_mask=None)[0]
    ref_taps.append(x.numpy())
  ref = torch.nn.functional.layer_norm(x, (acfg.d_model,), _t(enc["layer_norm"]["scale"]),
                                       _t(enc["layer_norm"]["bias"]), eps=acfg.layer_norm_eps)
  keep = valid.numpy()  # padded query rows are discarded by the reference
  np.testing.assert_allclose(np.asarray(final)[keep], ref.numpy()[keep], atol=1e-4, rtol=1e-4)
  for k, layer_idx in enumerate(acfg.deepstack_encoder_layer_indexes):
    np.testing.assert_allclose(np.asarray(taps[k])[keep], ref_taps[layer_idx][keep],
                               atol=1e-4, rtol=1e-4)


def test_llm_and_deepstack_match_torch_qwen3(setup, encoded):
  """Qwen3ForCausalLM fed our encode_audio output, mergers added by forward hooks on layers 0..2."""
  torch = pytest.importorskip("torch")
  from transformers import Qwen3Config, Qwen3ForCausalLM
  cfg, params, fwd, batch, (a, _) = setup
  tc = cfg.text
  qcfg = Qwen3Config(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
                     intermediate_size=tc.intermediate_size, num_hidden_layers=tc.num_hidden_layers,
                     num_attention_heads=tc.num_attention_heads,
                     num_key_value_heads=tc.num_key_value_heads, head_dim=tc.head_dim,
                     rope_theta=tc.rope_theta, rms_norm_eps=tc.rms_norm_eps,
                     tie_word_embeddings=False, attn_implementation="eager")
  ref = Qwen3ForCausalLM(qcfg).eval()
  lm = M.unstack_layers(params)["language_model"]
  sd = {"model.embed_tokens.weight": lm["embed_tokens"]["embedding"],
        "model.norm.weight": lm["norm"]["scale"],
        "lm_head.weight": np.asarray(params["lm_head"]["kernel"]).T}
  for i in range(tc.num_hidden_layers):
    p, pre = lm[f"layers_{i}"], f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = p["input_layernorm"]["scale"]
    sd[pre + "post_attention_layernorm.weight"] = p["post_attention_layernorm"]["scale"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      sd[pre + f"self_attn.{name}.weight"] = np.asarray(p["self_attn"][name]["kernel"]).T
    for name in ("q_norm", "k_norm"):
      sd[pre + f"self_attn.{name}.weight"] = p["self_attn"][name]["scale"]
    for name in ("gate_proj", "up_proj", "down_proj"):
      sd[pre + f"mlp.{name}.weight"] = np.asarray(p["mlp"][name]["kernel"]).T
  ref.load_state_dict({k: _t(v) for k, v in sd.items()})

  row = {k: v[1:2] for k, v in batch.items()}  # sample a alone, padded to 40 tokens
  n = len(a["ids"])
  adapter_out, merger_outs = (x[..., 1:2, :, :] for x in encoded)  # row 1 of the batch
  audio_pos = np.nonzero(a["local"] >= 0)[0]
  audio_idx = a["local"][audio_pos]
  embeds = ref.model.embed_tokens(torch.from_numpy(a["ids"]).long()[None]).detach().clone()
  embeds[0, audio_pos] = _t(np.asarray(adapter_out)[0, audio_idx])

  def hook(k):
    add = _t(np.asarray(merger_outs)[k, 0, audio_idx])

    def fn(module, inputs, output):
      hidden = output[0] if isinstance(output, tuple) else output
      hidden = hidden.clone()
      hidden[0, audio_pos] += add
      return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
    return fn

  handles = [ref.model.layers[k].register_forward_hook(hook(k)) for k in range(3)]
  with torch.no_grad():
    want = ref(inputs_embeds=embeds).logits[0].numpy()
  for h in handles:
    h.remove()
  got = np.asarray(fwd(params, row))[0, :n]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
