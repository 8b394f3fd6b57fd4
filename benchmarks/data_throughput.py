"""Input pipeline throughput: audio seconds delivered per second per worker process, as JSON.

    python benchmarks/data_throughput.py [--config configs/pretrain.py:demo] [--batches 30]
                                         [--workers 0,1] [--modes waveform,mel]

For each feature mode (waveform: the accelerator computes the mel; mel: NumPy mel on the host) and
each worker count, it builds `pipeline.make_train_loader` from the config (default: the demo preset
on the sample corpus), skips a few warm-up batches (worker start, imports), then times `--batches`
batches and counts the audio they carry (valid mel frames / 100). "Per worker process" divides by
the processes decoding: num_workers, or 1 for in-process loading (num_workers=0).

Beside it, in the same run and on the same decoded clips, the throughput of librosa's own mel
spectrogram (librosa.feature.melspectrogram, n_fft 400, hop 160, 128 mels: the usual
what-you-would-write-instead), of our NumPy reference log-mel (features.log_mel) and of decoding
alone (audio.load_audio), all single process. Wall-clock figures on a shared machine are noisy:
compare numbers from one run, not across runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_pipelines import audio, features, manifest, pipeline  # noqa: E402  pylint: disable=wrong-import-position
from moss_jax import batch as batch_lib  # noqa: E402  pylint: disable=wrong-import-position

FRAMES_PER_SECOND = batch_lib.SAMPLE_RATE / batch_lib.HOP_LENGTH


def _batch_audio_seconds(batch: dict) -> float:
  return float(batch["audio_chunk_frames"].sum()) / FRAMES_PER_SECOND


def loader_throughput(config, feature_mode: str, num_workers: int, batches: int,
                      warmup: int) -> dict:
  """Times `batches` batches of make_train_loader after `warmup` untimed ones."""
  config = config.copy_and_resolve_references()
  config.data.feature_mode = feature_mode
  config.data.num_workers = num_workers
  loader = pipeline.make_train_loader(config, process_index=0, process_count=1)
  try:
    for _ in range(warmup):
      next(loader)
    audio_s = tokens = 0.0
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(loader)
      audio_s += _batch_audio_seconds(batch)
      tokens += float((batch["segment_ids"] > 0).sum())
    wall = time.perf_counter() - start
  finally:
    loader.close()
  processes = max(1, num_workers)
  return {"feature_mode": feature_mode, "num_workers": num_workers, "batches": batches,
          "batch_rows": config.data.batch_size, "wall_s": round(wall, 3),
          "audio_s": round(audio_s, 2), "audio_s_per_s": round(audio_s / wall, 1),
          "audio_s_per_s_per_worker": round(audio_s / wall / processes, 1),
          "batches_per_s": round(batches / wall, 2), "tokens_per_s": round(tokens / wall, 1),
          "bad_records": loader.bad_record_counts()}


def _clip_paths(manifest_paths: list[str]) -> list[str]:
  paths = []
  for path in manifest_paths:
    for sample in manifest.read_manifest(path):
      if isinstance(sample, manifest.Sample):
        paths += [a.path for a in sample.audios]
  return sorted(set(paths))


def _timed(fn, items, min_seconds: float) -> tuple[float, int]:
  """Runs fn over all items, repeatedly until min_seconds passed; (wall, passes)."""
  passes, start = 0, time.perf_counter()
  while True:
    for item in items:
      fn(item)
    passes += 1
    wall = time.perf_counter() - start
    if wall >= min_seconds:
      return wall, passes


def baselines(paths: list[str], min_seconds: float) -> dict:
  """Single-process throughput of decoding, our NumPy log-mel and librosa's melspectrogram."""
  import librosa  # pylint: disable=import-outside-toplevel
  waves = [audio.load_audio(p) for p in paths]
  total_s = sum(len(w) for w in waves) / batch_lib.SAMPLE_RATE

  def librosa_mel(w):
    return librosa.feature.melspectrogram(y=w, sr=batch_lib.SAMPLE_RATE, n_fft=batch_lib.N_FFT,
                                          hop_length=batch_lib.HOP_LENGTH,
                                          n_mels=batch_lib.NUM_MEL_BINS)

  librosa_mel(waves[0])  # first call builds librosa's filter cache
  features.log_mel(waves[0])
  out = {"clips": len(waves), "audio_s": round(total_s, 2)}
  for name, fn, items in (("decode_load_audio", audio.load_audio, paths),
                          ("features_log_mel", features.log_mel, waves),
                          ("librosa_melspectrogram", librosa_mel, waves)):
    wall, passes = _timed(fn, items, min_seconds)
    out[name] = {"audio_s_per_s": round(total_s * passes / wall, 1), "passes": passes}
  out["librosa_version"] = librosa.__version__
  return out


def load_config(spec: str):
  """'configs/pretrain.py:demo' -> that file's get_config('demo') (preset optional)."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_benchmark_config", path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "pretrain.py") + ":demo")
  parser.add_argument("--modes", default="waveform,mel")
  parser.add_argument("--workers", default="0", help="comma-separated num_workers values")
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5,
                      help="untimed batches first: worker start-up and filling the prefetch buffers")
  parser.add_argument("--baseline-seconds", type=float, default=3.0,
                      help="minimum timed seconds per baseline")
  parser.add_argument("--quick", action="store_true", help="5 batches, 1 s baselines (a smoke run)")
  args = parser.parse_args(argv)
  if args.quick:
    args.batches, args.warmup, args.baseline_seconds = 5, 1, 1.0
  config = load_config(args.config)
  results = [loader_throughput(config, mode, int(w), args.batches, args.warmup)
             for mode in args.modes.split(",") for w in args.workers.split(",")]
  base = baselines(_clip_paths(manifest.manifest_paths(config.data.train_manifests)),
                   args.baseline_seconds)
  librosa_rate = base["librosa_melspectrogram"]["audio_s_per_s"]
  for r in results:
    r["vs_librosa_melspectrogram"] = round(r["audio_s_per_s_per_worker"] / librosa_rate, 3)
  print(json.dumps({
      "benchmark": "data_throughput", "config": args.config,
      "train_manifests": config.data.train_manifests, "machine": platform.machine(),
      "cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
      "pipeline": results, "baselines_single_process": base}, indent=1))


if __name__ == "__main__":
  main()
