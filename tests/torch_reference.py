"""A PyTorch MOSS-Audio reference built from transformers 4.57.1 blocks, for parity tests only.

The official modeling file is not on the Hub, so this module re-creates its forward pass from the
spec (sections 2-4) using the same building blocks the official code uses: transformers'
`WhisperEncoderLayer` (eager attention, k_proj without bias) for the encoder blocks and
`Qwen3Model` for the LLM. The glue written here (conv stem, sinusoid positions, 400-frame chunking
padded to the call's global max chunk, GatedMLP adapters, DeepStack forward hooks on decoder
layers 0..K-1, masked_scatter of audio embeddings, separate lm_head) follows the spec, so the
state_dict keys are exactly the reference checkpoint names and the logits are what the official
code computes (in float32).

It also writes its weights the way the released repos store them (`save_reference_checkpoint`),
so the JAX loader is tested against files it did not write itself.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3Model, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

CHUNK_FRAMES = 400  # 2 * n_window (n_window = 200 in the current official code)
CONV_CHUNKSIZE = 64  # chunks per conv-stem group; only affects memory in the reference


def tiny_reference_config(audio_token_id: int = 7, taps=(0, 1, 2), vocab_size: int = 300) -> dict:
  """A tiny config.json in the reference layout (spec 6.2): 4 encoder layers, 4 LLM layers."""
  audio = dict(
      d_model=64, output_dim=64, num_mel_bins=128, encoder_layers=4, encoder_attention_heads=4,
      encoder_ffn_dim=128, downsample_rate=8, downsample_hidden_size=8,
      encoder_attention_window_size=100, max_source_positions=1500, dropout=0.0,
      attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
      layer_norm_eps=1e-5, _attn_implementation="eager", pretrained_path="",
      deepstack_encoder_layer_indexes=list(taps))
  language = dict(
      architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
      attention_dropout=0.0, bos_token_id=1, eos_token_id=2, head_dim=16, hidden_act="silu",
      hidden_size=48, initializer_range=0.02, intermediate_size=96,
      layer_types=["full_attention"] * 4, max_position_embeddings=2048, max_window_layers=4,
      num_attention_heads=4, num_hidden_layers=4, num_key_value_heads=2, rms_norm_eps=1e-6,
      rope_scaling=None, rope_theta=1_000_000.0, sliding_window=None, tie_word_embeddings=False,
      use_cache=True, use_sliding_window=False, vocab_size=vocab_size, dtype="float32")
  return dict(
      architectures=["MossAudioModel"], model_type="moss_audio", adapter_hidden_size=80,
      deepstack_num_inject_layers=3, ignore_index=-100, dtype="float32", bos_token_id=1,
      eos_token_id=2, num_hidden_layers=4, vocab_size=vocab_size, tie_word_embeddings=False,
      transformers_version="4.57.1", audio_config=audio, language_config=language,
      # Not in the real config.json (it lives in processor_config.json); kept here for the test.
      _audio_token_id=audio_token_id)


class GatedMLP(nn.Module):
  """down(SiLU(gate(x)) * up(x)), all bias-free (spec 3)."""

  def __init__(self, d_in: int, hidden: int, d_out: int):
    super().__init__()
    self.gate_proj = nn.Linear(d_in, hidden, bias=False)
    self.up_proj = nn.Linear(d_in, hidden, bias=False)
    self.down_proj = nn.Linear(hidden, d_out, bias=False)

  def forward(self, x):
    return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _conv_out(n: torch.Tensor) -> torch.Tensor:
  """Time length after one stride-2, pad-1, kernel-3 conv: floor((n - 1) / 2) + 1."""
  return (n - 1) // 2 + 1


def sinusoids(length: int, channels: int) -> torch.Tensor:
  """Whisper sinusoid table, sin block then cos block, computed in float32 (spec 2.2)."""
  half = channels // 2
  inv = torch.exp(-torch.arange(half, dtype=torch.float32) * (math.log(10000.0) / (half - 1)))
  t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
  return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class AudioEncoder(nn.Module):
  """Conv stem + Whisper encoder layers over independent 400-frame chunks (spec 2)."""

  def __init__(self, cfg: dict):
    super().__init__()
    d, ch = cfg["d_model"], cfg["downsample_hidden_size"]
    assert cfg["num_mel_bins"] == 128 and cfg["output_dim"] == d
    self.conv1 = nn.Conv2d(1, ch, 3, stride=2, padding=1)
    self.conv2 = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
    self.conv3 = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
    self.stem_proj = nn.Linear(ch * 16, d)
    wcfg = WhisperConfig(
        d_model=d, encoder_attention_heads=cfg["encoder_attention_heads"],
        encoder_ffn_dim=cfg["encoder_ffn_dim"], activation_function=cfg["activation_function"],
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    wcfg._attn_implementation = "eager"
    self.layers = nn.ModuleList([WhisperEncoderLayer(wcfg) for _ in range(cfg["encoder_layers"])])
    for layer in self.layers:
      assert layer.self_attn.k_proj.bias is None
    self.layer_norm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
    self.taps = list(cfg["deepstack_encoder_layer_indexes"])
    self.d_model = d

  def chunk(self, mel: torch.Tensor, lengths: torch.Tensor):
    """Cuts each audio into 400-frame chunks and pads them all to the global max chunk length."""
    pieces = []
    for a in range(mel.shape[0]):
      total = int(lengths[a])
      for start in range(0, total, CHUNK_FRAMES):
        pieces.append(mel[a, :, start:min(start + CHUNK_FRAMES, total)])
    lmax = max(p.shape[1] for p in pieces)
    chunks = torch.zeros(len(pieces), mel.shape[1], lmax, dtype=mel.dtype)
    for i, p in enumerate(pieces):
      chunks[i, :, :p.shape[1]] = p
    return chunks, torch.tensor([p.shape[1] for p in pieces])

  def encode_group(self, chunks: torch.Tensor, frames: torch.Tensor):
    """Encodes one group of chunks; returns (final [N, T, D], taps list, valid token counts)."""
    x = chunks[:, None]  # [N, 1, freq, time]
    x = nn.functional.gelu(self.conv1(x))
    x = nn.functional.gelu(self.conv2(x))
    x = nn.functional.gelu(self.conv3(x))
    n, c, f, t = x.shape
    x = x.permute(0, 3, 1, 2).reshape(n, t, c * f)  # feature index c * 16 + f
    x = self.stem_proj(x)
    tokens = _conv_out(_conv_out(_conv_out(frames)))
    tmax = int(tokens.max())
    x = x[:, :tmax]
    x = x + sinusoids(tmax, self.d_model).to(x.dtype)[None]
    valid = torch.arange(tmax)[None, :] < tokens[:, None]
    mask = (1.0 - valid.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
    saved = {}
    for k, layer in enumerate(self.layers):
      x = layer(x, mask, layer_head_mask=None)[0]  # 4.57.1 layers return (hidden, attn)
      saved[k] = x  # raw residual stream, before any final LayerNorm (spec 2.5)
    return self.layer_norm(x), [saved[k] for k in self.taps], valid

  def forward(self, mel: torch.Tensor, lengths: torch.Tensor):
    """Returns (final tokens [N_total, D], taps [K][N_total, D]) in (audio, chunk, time) order."""
    chunks, frames = self.chunk(mel, lengths)
    outs, tap_outs = [], [[] for _ in self.taps]
    for g in range(0, chunks.shape[0], CONV_CHUNKSIZE):
      final, taps, valid = self.encode_group(chunks[g:g + CONV_CHUNKSIZE],
                                             frames[g:g + CONV_CHUNKSIZE])
      outs.append(final[valid])
      for i, tap in enumerate(taps):
        tap_outs[i].append(tap[valid])
    return torch.cat(outs), [torch.cat(t) for t in tap_outs]


class TorchMossAudio(nn.Module):
  """The whole reference model; `forward` returns float logits [B, S, V]."""

  def __init__(self, config: dict, audio_token_id: int | None = None):
    super().__init__()
    self.config = config
    self.audio_token_id = config.get("_audio_token_id", 151654) if audio_token_id is None \
        else audio_token_id
    lang = dict(config["language_config"])
    lang.pop("architectures", None)
    lang.pop("model_type", None)
    qcfg = Qwen3Config(**lang)
    qcfg._attn_implementation = "eager"
    self.audio_encoder = AudioEncoder(config["audio_config"])
    d, h = config["audio_config"]["d_model"], qcfg.hidden_size
    hidden = config["adapter_hidden_size"]
    n_merge = min(len(config["audio_config"]["deepstack_encoder_layer_indexes"]),
                  config["deepstack_num_inject_layers"])
    self.audio_adapter = GatedMLP(d, hidden, h)
    self.deepstack_audio_merger_list = nn.ModuleList(
        [GatedMLP(d, hidden, h) for _ in range(n_merge)])
    self.language_model = Qwen3Model(qcfg)
    self.lm_head = nn.Linear(h, qcfg.vocab_size, bias=False)

  def forward(self, input_ids, audio_mel=None, audio_mel_lengths=None):
    embeds = self.language_model.embed_tokens(input_ids)
    mask = input_ids == self.audio_token_id
    hooks = []
    if audio_mel is not None:
      final, taps = self.audio_encoder(audio_mel, audio_mel_lengths)
      if int(mask.sum()) != final.shape[0]:
        raise ValueError(f"{int(mask.sum())} placeholders but {final.shape[0]} audio tokens")
      audio = self.audio_adapter(final)
      embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), audio.to(embeds.dtype))
      for k, merger in enumerate(self.deepstack_audio_merger_list):
        hooks.append(self.language_model.layers[k].register_forward_hook(
            _deepstack_hook(mask, merger(taps[k]))))
    try:
      positions = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
      out = self.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    finally:
      for hook in hooks:
        hook.remove()
    return self.lm_head(out.last_hidden_state)


def _deepstack_hook(mask: torch.Tensor, values: torch.Tensor):
  """A forward hook adding `values` (row-major) to a decoder layer's output at audio positions."""

  def hook(module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = hidden.clone()
    hidden[mask] = hidden[mask] + values.to(hidden.dtype)
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

  return hook


def randomize_(module: nn.Module, seed: int, scale: float = 0.15) -> None:
  """Random weights large enough that every parameter visibly affects the logits."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) * (scale * 8 / math.sqrt(fan_in)))


def save_reference_checkpoint(model: TorchMossAudio, path: str, processor_extra: dict | None = None,
                              dtype: torch.dtype = torch.float32) -> None:
  """Writes the directory the released repos ship: one model.safetensors + the config files."""
  from safetensors.torch import save_file
  os.makedirs(path, exist_ok=True)
  state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  proc = dict(processor_class="MossAudioProcessor", enable_time_marker=True,
              audio_token_id=model.audio_token_id, audio_start_id=8, audio_end_id=9,
              mel_config=dict(mel_sr=16000, mel_dim=128, mel_n_fft=400, mel_hop_length=160,
                              mel_dtype="bfloat16", use_whisper_feature_extractor=True))
  proc.update(processor_extra or {})
  with open(os.path.join(path, "processor_config.json"), "w") as f:
    json.dump(proc, f, indent=2)


def random_reference_dir(path: str, audio_token_id: int = 7, audio_start_id: int = 8,
                         audio_end_id: int = 9) -> TorchMossAudio:
  """A tiny reference model with seeded random weights (eval mode), written to `path` in the
  released format; the fixture every parity test starts from."""
  torch.manual_seed(0)
  ref = TorchMossAudio(tiny_reference_config(audio_token_id=audio_token_id))
  randomize_(ref, seed=1)
  ref.eval()
  save_reference_checkpoint(ref, path, processor_extra=dict(audio_start_id=audio_start_id,
                                                           audio_end_id=audio_end_id))
  return ref
