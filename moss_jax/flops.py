"""Analytic FLOP count of one training step, and MFU.

Only matrix products are counted (2 FLOPs per multiply-add): the conv stem, every projection,
the attention score and value products, the adapter and DeepStack mergers, and the LM head.
Shapes are the static ones the step computes: every chunk slot of every row runs through the
encoder (empty slots included), and every packed token through the LLM.

Backward cost follows what autodiff actually needs, group by group:
  * a product with a weight operand costs its forward again for the weight gradient when that
    weight is trained, and again for the input gradient when anything upstream is trained;
  * a product of two activations (attention) costs twice its forward when gradients flow.
So frozen parts cost their forward only, unless a trained part lies upstream (stage 1 trains the
adapter, so gradients still cross the frozen LLM to reach it: input gradients only).
Causal LLM attention is counted at `causal_factor` (0.5: half the score matrix is useful); the
XLA kernels compute the full square, so the cost-analysis test passes causal_factor=1.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from moss_jax import batch as batch_lib
from moss_jax.model_config import num_mergers

# Parameter groups, in the order data flows through them.
ENCODER, ADAPTER, LLM = "encoder", "adapter", "llm"

# Which groups each stage trains (mirrors optim.STAGE_TRAINABLE at group granularity).
STAGE_GROUPS = {
    "adapter": (ADAPTER,),
    "full": (ENCODER, ADAPTER, LLM),
    "encoder_frozen": (ADAPTER, LLM),
}

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor figures, no sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


@dataclasses.dataclass(frozen=True)
class Product:
  """One family of matrix products: forward FLOPs, its owner, and what lies upstream."""
  name: str
  flops: float
  owner: str  # group whose parameters are an operand ("" for activation x activation)
  upstream: tuple[str, ...]  # groups whose parameters the product's activation input depends on
  weight: bool = True  # False: both operands are activations (attention)

  def backward(self, trained: tuple[str, ...]) -> float:
    grad_flows = any(g in trained for g in self.upstream)
    if not self.weight:
      return 2 * self.flops if grad_flows else 0.0
    return self.flops * ((self.owner in trained) + grad_flows)


def _conv_out(n: int) -> int:
  return (n - 1) // 2 + 1  # kernel 3, stride 2, padding 1


def encoder_products(audio, num_chunks: int, chunk_frames: int = batch_lib.CHUNK_FRAMES):
  """Conv stem + transformer over `num_chunks` independent chunk sequences."""
  h = audio.downsample_hidden_size
  freq, time_ = audio.num_mel_bins, chunk_frames
  stem = []
  c_in = 1
  for i in range(3):
    freq, time_ = _conv_out(freq), _conv_out(time_)
    stem.append(Product(f"conv{i + 1}", num_chunks * 2.0 * freq * time_ * h * 9 * c_in, ENCODER,
                        () if i == 0 else (ENCODER,)))
    c_in = h
  t, d = time_, audio.d_model
  n_tok = num_chunks * t
  n_layers = audio.encoder_layers
  return stem + [
      Product("stem_proj", n_tok * 2.0 * freq * h * d, ENCODER, (ENCODER,)),
      Product("encoder_qkvo", n_layers * n_tok * 2.0 * 4 * d * d, ENCODER, (ENCODER,)),
      Product("encoder_mlp", n_layers * n_tok * 2.0 * 2 * d * audio.encoder_ffn_dim, ENCODER,
              (ENCODER,)),
      Product("encoder_attention", n_layers * num_chunks * 2.0 * 2 * t * t * d, "", (ENCODER,),
              weight=False),
  ]


def adapter_products(model_config, num_audio_tokens: int):
  """The adapter and every DeepStack merger, each a SwiGLU MLP over all encoder tokens."""
  d, a = model_config.audio.d_model, model_config.adapter_hidden_size
  hidden = model_config.text.hidden_size
  n = (1 + num_mergers(model_config)) * num_audio_tokens
  return [
      Product("adapter_gate_up", n * 2.0 * 2 * d * a, ADAPTER, (ENCODER,)),
      Product("adapter_down", n * 2.0 * a * hidden, ADAPTER, (ENCODER, ADAPTER)),
  ]


def llm_products(text, batch_size: int, seq_len: int, causal_factor: float = 0.5):
  """Qwen3 decoder layers and the LM head over `batch_size` packed rows of `seq_len` tokens."""
  hidden, hd = text.hidden_size, text.head_dim
  q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
  n_tok = batch_size * seq_len
  n_layers = text.num_hidden_layers
  up = (ENCODER, ADAPTER, LLM)
  return [
      Product("llm_qkvo", n_layers * n_tok * 2.0 * (2 * hidden * q + 2 * hidden * kv), LLM, up),
      Product("llm_mlp", n_layers * n_tok * 2.0 * 3 * hidden * text.intermediate_size, LLM, up),
      Product("llm_attention", causal_factor * n_layers * batch_size * 2.0 * 2 * seq_len * seq_len * q,
              "", up, weight=False),
      Product("lm_head", n_tok * 2.0 * hidden * text.vocab_size, LLM, up),
  ]


def model_products(model_config, batch_size: int, max_tokens: int, max_audio_chunks: int,
                   causal_factor: float = 0.5):
  chunks = batch_size * max_audio_chunks
  tokens_per_chunk = batch_lib.TOKENS_PER_CHUNK
  return (encoder_products(model_config.audio, chunks)
          + adapter_products(model_config, chunks * tokens_per_chunk)
          + llm_products(model_config.text, batch_size, max_tokens, causal_factor))


def step_flops(model_config, batch_size: int, max_tokens: int, max_audio_chunks: int,
               stage: str = "full", causal_factor: float = 0.5, train: bool = True) -> dict:
  """{'forward', 'backward', 'total', 'by_product'} FLOPs of one step over `batch_size` rows."""
  if stage not in STAGE_GROUPS:
    raise ValueError(f"unknown training stage {stage!r}")
  trained = STAGE_GROUPS[stage] if train else ()
  prods = model_products(model_config, batch_size, max_tokens, max_audio_chunks, causal_factor)
  fwd = sum(p.flops for p in prods)
  bwd = sum(p.backward(trained) for p in prods)
  return {
      "forward": fwd,
      "backward": bwd,
      "total": fwd + bwd,
      "by_product": {p.name: p.flops + p.backward(trained) for p in prods},
  }


def config_step_flops(config, causal_factor: float = 0.5) -> float:
  """Total training FLOPs of one optimizer step of a full run config (all micro-batches)."""
  return step_flops(config.model, config.data.batch_size, config.data.max_tokens,
                    config.data.max_audio_chunks, config.train.stage, causal_factor)["total"]


def measure_matmul_peak(n: int = 1024, dtype: str = "float32", repeats: int = 5,
                        device=None) -> float:
  """Measured FLOP/s of an n x n matmul on one device (best of `repeats`); the CPU's own peak."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops(override_per_device: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of all devices of the run, where the figure came from).

  Accelerators: the vendor table (or the config override) times the device count. CPU: the
  forced host "devices" share the same cores, so the figure is one measured f32 matmul per
  process (it already uses every core), times the process count.
  """
  devices = jax.devices()
  if override_per_device and override_per_device > 0:
    return float(override_per_device) * len(devices), "config"
  kind = getattr(devices[0], "device_kind", "")
  if devices[0].platform != "cpu":
    for prefix, peak in PEAK_FLOPS.items():
      if kind.startswith(prefix):
        return peak * len(devices), f"table:{prefix}"
  return measure_matmul_peak() * jax.process_count(), f"measured f32 matmul ({kind or 'cpu'})"


def mfu(flops_per_step: float, step_seconds: float, peak_total: float) -> float:
  """Model FLOPs utilisation: analytic FLOP/s over the peak of all devices."""
  if step_seconds <= 0 or peak_total <= 0:
    return 0.0
  return flops_per_step / step_seconds / peak_total
