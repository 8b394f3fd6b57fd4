"""Decode speed with the KV cache vs recomputing the whole sequence for every new token.

    python benchmarks/generate.py [--prompt_tokens 1000] [--new_tokens 128] [--batch 1]

The mid-size benchmark model (benchmarks/train_step.py: mid_config, ~12 M parameters, float32)
with random weights decodes `new_tokens` greedily after a prompt of `prompt_tokens` tokens (100 of
them audio placeholders fed by two 4 s mel chunks) in two ways, in the same process:
  cache      moss_jax.decoding: prefill once into a KV cache, then one-token steps;
  recompute  a jitted loop that reruns the model over the whole fixed-length token buffer
             (prompt + new tokens) and takes the argmax at the last filled position, as
             moss_jax.generate did before the cache.
Both are compiled before timing; the figures are decode tokens/s (prefill excluded for the cache:
timed separately with max_new_tokens=1) and the speed-up. The two token streams are compared.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompt(config, batch: int, prompt_tokens: int, seed: int = 0):
  """A prompt batch in the training schema: text ids, 100 audio placeholders from position 10."""
  import numpy as np
  from moss_jax import batch as batch_lib
  rng = np.random.default_rng(seed)
  vocab = config.model.text.vocab_size
  chunks = 2
  audio = chunks * batch_lib.TOKENS_PER_CHUNK
  ids = rng.integers(10, vocab, (batch, prompt_tokens)).astype(np.int32)
  index = np.full((batch, prompt_tokens), -1, np.int32)
  index[:, 10:10 + audio] = np.arange(audio)
  return dict(
      input_ids=ids, positions=np.broadcast_to(np.arange(prompt_tokens, dtype=np.int32),
                                               (batch, prompt_tokens)).copy(),
      segment_ids=np.ones((batch, prompt_tokens), np.int32), audio_token_index=index,
      audio_chunk_frames=np.full((batch, chunks), batch_lib.CHUNK_FRAMES, np.int32),
      audio_chunk_audio_id=np.ones((batch, chunks), np.int32),
      audio_mel=rng.normal(0, 0.5, (batch, chunks, batch_lib.NUM_MEL_BINS,
                                    batch_lib.CHUNK_FRAMES)).astype(np.float32))


def _recompute_fn(model, config, prompt_len: int, new_tokens: int):
  """Greedy decoding without a cache: the whole [B, prompt + new] buffer through the model per
  token (the encoder outputs are computed once, as the old implementation did)."""
  import jax
  import jax.numpy as jnp
  from moss_jax.model import MossAudioModel
  from moss_jax.model.mel import model_audio_mel

  def logits_at(module, ids, positions, segment_ids, adapter_out, merger_outs, index, last):
    x, inject = module.embed_with_audio(ids, index, adapter_out, merger_outs)
    hidden = module.language_model(x, positions, segment_ids, inject)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return module.lm_head(h).astype(jnp.float32)

  def run(params, batch):
    v = {"params": params}
    adapter_out, merger_outs = model.apply(v, model_audio_mel(batch, config.model),
                                           batch["audio_chunk_frames"],
                                           method=MossAudioModel.encode_audio)
    b = batch["input_ids"].shape[0]
    length = prompt_len + new_tokens
    pad = lambda x, fill: jnp.pad(x, ((0, 0), (0, new_tokens)), constant_values=fill)
    ids, index = pad(batch["input_ids"], 0), pad(batch["audio_token_index"], -1)
    cols = jnp.arange(length)[None, :]

    def body(t, carry):
      ids, out = carry
      cur = prompt_len + t
      seg = (cols < cur).astype(jnp.int32)
      pos = jnp.where(seg > 0, cols, 0).astype(jnp.int32)
      logits = model.apply(v, ids, pos, seg, adapter_out, merger_outs, index,
                           jnp.full((b,), cur - 1), method=logits_at)
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      ids = jax.lax.dynamic_update_slice_in_dim(ids, nxt[:, None], cur, axis=1)
      return ids, out.at[:, t].set(nxt)

    out = jnp.zeros((b, new_tokens), jnp.int32)
    return jax.lax.fori_loop(0, new_tokens, body, (ids, out))[1]

  return jax.jit(run)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--prompt_tokens", type=int, default=1000)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (median)")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))

  import statistics
  import jax
  import numpy as np
  from train_step import mid_config
  from moss_jax import decoding
  from moss_jax.model import MossAudioModel, count_params, init_params

  config = mid_config("full", (1, 1, 1), 1)
  model = MossAudioModel(config=config.model)
  params = init_params(config.model, jax.random.key(0))
  batch = _prompt(config, args.batch, args.prompt_tokens)
  kw = dict(stop_ids=(-1,), pad_id=0)

  def timed(fn):
    fn()  # compile + warm-up
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - t0)
    return statistics.median(times), out

  prefill_s, _ = timed(lambda: decoding.generate(model, params, batch, max_new_tokens=1, **kw))
  cache_s, cached = timed(lambda: decoding.generate(model, params, batch,
                                                    max_new_tokens=args.new_tokens, **kw))
  recompute = _recompute_fn(model, config, args.prompt_tokens, args.new_tokens)
  full_s, full = timed(lambda: np.asarray(recompute(params, batch)))
  decode_tokens = args.batch * (args.new_tokens - 1)
  cache_tps = decode_tokens / max(cache_s - prefill_s, 1e-9)
  full_tps = args.batch * args.new_tokens / full_s
  print(json.dumps({
      "params": count_params(params), "prompt_tokens": args.prompt_tokens,
      "new_tokens": args.new_tokens, "batch": args.batch, "backend": jax.default_backend(),
      "prefill_s": round(prefill_s, 4), "cache_total_s": round(cache_s, 4),
      "recompute_total_s": round(full_s, 4),
      "cache_decode_tokens_per_s": round(cache_tps, 1),
      "recompute_tokens_per_s": round(full_tps, 2),
      "speedup": round(cache_tps / full_tps, 1),
      "same_tokens": bool((np.asarray(cached) == np.asarray(full)).all()),
  }, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
