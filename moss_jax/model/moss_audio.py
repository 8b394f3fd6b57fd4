"""MossAudioModel: encoder -> adapter / DeepStack mergers -> Qwen3 LLM -> lm_head.

Audio placement is a static gather: `audio_token_index[b, l]` is the flat index (chunk * T' + t)
into row b's encoder output, -1 for text. The adapter output replaces the text embedding there;
merger k's output is added to the output of LLM layer k at the same positions (spec section 3).

Generation uses `prefill` (encoder, adapter, DeepStack and the prompt, once, into a KV cache) and
then `decode_step` per new token (text only: the DeepStack adds are zero off audio positions).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moss_jax.model import attention, layers, lora
from moss_jax.model.adapter import GatedMLP
from moss_jax.model.encoder import AudioEncoder
from moss_jax.model.llm import KVCache, Qwen3Model
from moss_jax.model_config import num_mergers

Array = jax.Array


def gather_audio(features: Array, audio_token_index: Array) -> Array:
  """features [B, N, H] gathered at audio_token_index [B, L] -> [B, L, H]; zeros at text."""
  idx = jnp.clip(audio_token_index, 0, features.shape[1] - 1)
  picked = jnp.take_along_axis(features, idx[..., None], axis=1)
  return jnp.where((audio_token_index >= 0)[..., None], picked, jnp.zeros_like(picked))


class MossAudioModel(nn.Module):
  """The whole model; `config` is config.model (moss_jax/model_config.py)."""
  config: ml_collections.ConfigDict

  # init/apply run with config.model.lora made current, so every Dense inside (whatever method
  # or lambda is applied) sees the LoRA targets; see moss_jax/model/lora.py.
  @nn.nowrap
  def init_with_output(self, *args, **kwargs):
    with lora.active(lora.spec_from_config(self.config)):
      return super().init_with_output(*args, **kwargs)

  @nn.nowrap
  def init(self, *args, **kwargs):
    with lora.active(lora.spec_from_config(self.config)):
      return super().init(*args, **kwargs)

  @nn.nowrap
  def apply(self, *args, **kwargs):
    with lora.active(lora.spec_from_config(self.config)):
      return super().apply(*args, **kwargs)

  def setup(self):
    cfg = self.config
    dtype, pdtype = layers.as_dtype(cfg.dtype), layers.as_dtype(cfg.param_dtype)
    unroll = cfg.get("scan_unroll", 1)
    self.audio_encoder = AudioEncoder(cfg.audio, dtype=dtype, param_dtype=pdtype,
                                      scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
                                      scan_unroll=unroll)
    mlp = dict(hidden_size=cfg.adapter_hidden_size, out_size=cfg.text.hidden_size, dtype=dtype,
               param_dtype=pdtype)
    # Under a remat policy the adapter and the mergers are recomputed in the backward pass too:
    # their weights (gathered whole from their FSDP shards) are then gathered again there rather
    # than held from the forward pass through the whole LLM (0.3 GiB of bf16 weights for 4b).
    mlp_cls = layers.maybe_remat(GatedMLP, cfg.remat_policy)
    self.audio_adapter = mlp_cls(**mlp)
    self.deepstack_audio_merger_list = [mlp_cls(**mlp) for _ in range(num_mergers(cfg))]
    # .get: model configs saved before these fields existed still load.
    self.language_model = Qwen3Model(
        cfg.text, dtype=dtype, param_dtype=pdtype, scan_layers=cfg.scan_layers,
        remat_policy=cfg.remat_policy, attention=cfg.get("attention", "auto"),
        attention_block_size=cfg.get("attention_block_size", attention.DEFAULT_BLOCK),
        scan_unroll=unroll)
    self.lm_head = layers.dense(cfg.text.vocab_size, ("embed", "vocab"), use_bias=False,
                                dtype=dtype, param_dtype=pdtype)

  def encode_audio(self, audio_mel: Array, audio_chunk_frames: Array) -> tuple[Array, Array | None]:
    """-> adapter_out [B, C*T', H] and merger_outs [K, B, C*T', H] (None when K = 0)."""
    b, c = audio_chunk_frames.shape
    final, taps = self.audio_encoder(audio_mel, audio_chunk_frames)
    flat = lambda x: layers.constrain(x.reshape(b, -1, x.shape[-1]), ("batch", "length", None))
    adapter_out = self.audio_adapter(flat(final))
    mergers = self.deepstack_audio_merger_list
    if not mergers:
      return adapter_out, None
    merger_outs = jnp.stack([m(flat(taps[k])) for k, m in enumerate(mergers)])
    return adapter_out, merger_outs

  def embed_with_audio(self, input_ids: Array, audio_token_index: Array | None,
                       adapter_out: Array | None, merger_outs: Array | None
                       ) -> tuple[Array, Array | None]:
    """Input embeddings with the adapter output placed at audio positions, and the DeepStack
    adds [K, B, L, H] (zeros off audio positions; None without mergers or audio).

    Split out of __call__ so generation can reuse precomputed encode_audio outputs.
    """
    x = self.language_model.embed(input_ids)
    if adapter_out is None:
      return x, None
    is_audio = (audio_token_index >= 0)[..., None]
    x = jnp.where(is_audio, gather_audio(adapter_out, audio_token_index).astype(x.dtype), x)
    if merger_outs is None:
      return x, None
    inject = jax.vmap(gather_audio, in_axes=(0, None))(merger_outs, audio_token_index)
    return x, layers.constrain(inject, (None, "batch", "length", "embed"))

  def prefill(self, input_ids: Array, positions: Array, segment_ids: Array, cache: KVCache,
              last_index: Array, audio_mel: Array | None = None,
              audio_chunk_frames: Array | None = None,
              audio_token_index: Array | None = None) -> tuple[Array, KVCache]:
    """Runs the prompts [B, L] (right-padded, one segment per row) and fills cache columns
    0..L-1. -> (float32 logits [B, vocab] at column last_index[b] of each row, cache)."""
    adapter_out = merger_outs = None
    if audio_mel is not None:
      adapter_out, merger_outs = self.encode_audio(audio_mel, audio_chunk_frames)
    x, inject = self.embed_with_audio(input_ids, audio_token_index, adapter_out, merger_outs)
    hidden, cache = self.language_model(x, positions, segment_ids, inject, cache=cache)
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    return self.logits(last), cache

  def decode_step(self, tokens: Array, cache: KVCache, decode_index: Array
                  ) -> tuple[Array, KVCache]:
    """One new text token per row (tokens [B]) at cache column = RoPE position decode_index[b].
    -> (float32 logits [B, vocab] for the token after it, cache)."""
    x = self.language_model.embed(tokens[:, None])
    hidden, cache = self.language_model(x, decode_index[:, None], None, cache=cache,
                                        decode_index=decode_index)
    return self.logits(hidden[:, 0]), cache

  def logits(self, hidden: Array) -> Array:
    """Float32 logits [..., V] from final hidden states [..., H] (the chunked loss calls this per
    token chunk, so the whole [B, L, V] array never exists)."""
    logits = self.lm_head(hidden)
    if logits.ndim == 3:
      logits = layers.constrain(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)

  def hidden_states(self, input_ids: Array, positions: Array, segment_ids: Array,
                    audio_mel: Array | None = None, audio_chunk_frames: Array | None = None,
                    audio_token_index: Array | None = None) -> Array:
    """Final hidden states [B, L, H] (after the last RMSNorm), before lm_head."""
    adapter_out = merger_outs = None
    if audio_mel is not None:
      adapter_out, merger_outs = self.encode_audio(audio_mel, audio_chunk_frames)
    x, inject = self.embed_with_audio(input_ids, audio_token_index, adapter_out, merger_outs)
    return self.language_model(x, positions, segment_ids, inject)

  def __call__(self, input_ids: Array, positions: Array, segment_ids: Array,
               audio_mel: Array | None = None, audio_chunk_frames: Array | None = None,
               audio_token_index: Array | None = None) -> Array:
    """Float32 logits [B, L, vocab]. Without audio_mel the model runs as a plain text LLM."""
    return self.logits(self.hidden_states(input_ids, positions, segment_ids, audio_mel,
                                          audio_chunk_frames, audio_token_index))
