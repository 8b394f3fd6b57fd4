r"""Training entry point: `python -m moss_jax.train --config configs/pretrain.py:demo --workdir DIR`.

One readable loop. Running the same command again resumes from the newest complete checkpoint
in DIR/checkpoints (parameters, optimizer state, step, every process's data iterator). Any
config field can be overridden on the command line (`--config.optim.lr=3e-4`).

Multi-process runs (TPU pod slices, SLURM, or launch/local.sh on one machine) start one copy per
host; see moss_jax/distributed.py for how the processes find each other.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import jax
from absl import flags, logging
from ml_collections import config_flags

from data_pipelines import pipeline, tokenizers
from data_pipelines.loader import ShardedLoader, global_bad_record_counts
from moss_jax import checkpoint, cli, config_validation, diagnostics, distributed, evaluate, export
from moss_jax import flops, generate, hf, host_memory, metrics, paths, progress, sharding
from moss_jax import workdir_lock
from moss_jax import train_step as ts
from moss_jax.config_validation import ConfigError
from moss_jax.errors import UserError
from moss_jax.model import count_params, init_params, lora

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-process).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: join the other processes when flags or a detected cluster (TPU VM, GKE, SLURM, MPI) "
    "say there are several; on: always join; off: run as a single process.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process at start-up.")


class TrainingDiverged(UserError, RuntimeError):
  """Too many consecutive non-finite updates (the message says what to change)."""


# ----------------------------------------------------------------------------- set-up

def write_config(config, workdir: str) -> None:
  """The resolved config (after overrides) as JSON and as its readable repr (workdir may be gs://)."""
  root = paths.run_path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  (root / "config.txt").write_text(str(config))


def check_tokenizer(config) -> None:
  """Every id the tokenizer can emit must have an embedding row (out-of-range ids would be
  clamped silently by the gather and trained on garbage)."""
  tok = tokenizers.load_tokenizer(config.data.tokenizer)
  specials = [getattr(tok, n) for n in tokenizers.SPECIAL_NAMES]
  needed = max([tok.vocab_size] + [i + 1 for i in specials if i is not None])
  if needed > config.model.text.vocab_size:
    raise ConfigError([f"the tokenizer {config.data.tokenizer.path} needs {needed} embedding rows "
                       f"but model.text.vocab_size is {config.model.text.vocab_size}"])


def initial_params(config, program):
  """Fresh or pretrained parameters, as train.init_* say; sharded like the state.

  With LoRA on (config.model.lora), a pretrained base that has no adapters gets fresh ones
  (B = 0, so step 0 computes exactly the pretrained model).
  """
  params = _initial_base_params(config, program)
  if lora.spec_from_config(config.model) is not None and not lora.has_adapters(params):
    params = lora.init_adapters(params, program.abstract_params,
                                jax.random.key(config.train.seed))
  return params


def _initial_base_params(config, program):
  train = config.train
  mesh = program.mesh
  if train.init_from_checkpoint:
    logging.info("initialising all parameters from run checkpoint %s", train.init_from_checkpoint)
    return checkpoint.restore_params(train.init_from_checkpoint, program.abstract_params)
  if train.init_from:
    logging.info("initialising the whole model from %s", train.init_from)
    _, params = hf.load_pretrained(train.init_from, dtype=config.model.param_dtype,
                                   config_overrides=_model_overrides(config), mesh=mesh)
    _check_same_shapes(params, lora.split(program.abstract_params)[0], train.init_from)
    return params
  with sharding.use_mesh(mesh):
    params = init_params(config.model, jax.random.key(train.seed), mesh)
  if train.init_encoder_from:
    logging.info("initialising the audio encoder from %s", train.init_encoder_from)
    _, loaded = hf.load_pretrained(train.init_encoder_from, dtype=config.model.param_dtype,
                                   config_overrides=_model_overrides(config), mesh=mesh)
    _check_same_shapes(loaded["audio_encoder"], program.abstract_params["audio_encoder"],
                       train.init_encoder_from)
    params = dict(params, audio_encoder=loaded["audio_encoder"])
  if train.init_llm_from:
    logging.info("initialising the LLM from Qwen3 checkpoint %s", train.init_llm_from)
    params = hf.load_qwen3_llm(train.init_llm_from, params)
  return params


def _model_overrides(config) -> dict:
  m = config.model
  return {"dtype": m.dtype, "param_dtype": m.param_dtype, "scan_layers": m.scan_layers,
          "remat_policy": m.remat_policy}


def _check_same_shapes(params, abstract, source: str) -> None:
  got = jax.tree.map(lambda x: tuple(x.shape), params)
  want = jax.tree.map(lambda x: tuple(x.shape), abstract)
  if got != want:
    raise ValueError(f"parameters in {source} do not match config.model: got {got}, want {want}")


# ----------------------------------------------------------------------------- the loop

def not_started(step: int, last: dict) -> dict[str, Any]:
  """train()'s result for a run a stop signal ended before its first step (nothing saved)."""
  return {"step": step, "preempted": True, "started": False, "last": last, "first_loss": None}


class Run:
  """Holds the pieces of one training run; `train()` is the loop."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = paths.run_path(workdir)  # absolute when local; gs://... kept as it is
    self.is_main = jax.process_index() == 0
    # Until the loop starts there is nothing to save: a stop signal ends set-up at once.
    self.stop = distributed.StopSignal(interruptible=True)
    self.lock = self.writer = self.loader = self.checkpointer = None
    self.profiler = self.watchdog = None
    try:
      self._set_up(config)
    except BaseException:
      self.close()  # the loader's threads and the lock, whatever set-up got to
      raise
    self.state = None
    self.first_loss = None

  def _set_up(self, config) -> None:
    config_validation.validate(config, jax.device_count(), jax.process_count())
    check_tokenizer(config)
    # Taken before anything in the workdir is written: a second run on it refuses here. The
    # config is written once a resume has checked it against the checkpoint (restore_or_init).
    self.lock = workdir_lock.WorkdirLock(self.workdir) if self.is_main else None
    train = config.train
    self.cache_dir = diagnostics.setup_compilation_cache(train.compilation_cache_dir,
                                                         self.workdir)
    self.mesh = sharding.make_mesh(config.mesh)
    # Measured (on CPU) before the data threads and the background compile below compete for the
    # cores: measured during the compile, the demo's peak came out at 56-92 instead of ~140
    # GFLOP/s and its MFU at 2x the truth.
    self.peak, self.peak_source = flops.peak_flops(config.train.peak_flops_per_device)
    self.writer = metrics.MetricWriter(self.workdir, enabled=self.is_main)
    self.writer.console(f"mesh {dict(self.mesh.shape)} over {jax.device_count()} devices, "
                        f"{jax.process_count()} process(es); stage {config.train.stage}")
    self.loader = ShardedLoader(config, jax.process_index(), jax.process_count())
    # One batch before minutes of compiling: a run whose every record is rejected stops now
    # with the reason (errors.NoUsableRecords). Then the loader is rewound to where it was.
    start = self.loader.get_state()
    next(self.loader)
    self.loader.set_state([start])
    self.program = ts.build_program(config, self.mesh)
    # The next batches are placed on the devices while a step runs (train.prefetch_to_device);
    # the wrapper also keeps the loader state of the batches consumed, for checkpoints.
    self.loader = ts.DevicePrefetch(self.loader, self.program.global_batch,
                                    train.prefetch_to_device)
    self.checkpointer = checkpoint.Checkpointer(
        self.workdir / "checkpoints", every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint)
    self.profiler = diagnostics.StepProfiler(self.workdir, train.profile_start,
                                             train.profile_steps)
    self.watchdog = diagnostics.Watchdog(train.watchdog_factor,
                                         train.watchdog_min_seconds)
    self.flops_per_step = flops.config_step_flops(config)

  # -- state

  def restore_or_init(self) -> int:
    """Resumes from the newest readable checkpoint (or initialises), then writes config.json:
    a resume with a config the checkpoint does not fit stops before the run's own is replaced."""
    with progress.Waiting(f"restoring the newest checkpoint of {self.checkpointer.directory}",
                          enabled=None if checkpoint.complete_steps(self.checkpointer.directory)
                          else False):
      restored = self.checkpointer.restore(
          self.program.abstract_state, config=self.config.to_dict(),
          apply_data_state=lambda data: self.loader.set_state(data["processes"]))
    if restored is not None:
      self.state = restored.state
      self.writer.console(f"resumed from step {restored.step} ({self.checkpointer.directory})")
      self.writer.truncate_after(restored.step)  # rows of the steps about to be redone
    else:
      params = initial_params(self.config, self.program)
      self.state = self.program.state_from_params(params)
      del params
    if self.is_main:
      write_config(self.config, self.workdir)
    n_train = count_params(self.state["params"])
    n_all = n_train + count_params(self.state["frozen"])
    self.writer.console(f"parameters: {n_all:,} ({n_train:,} trainable); analytic "
                        f"{self.flops_per_step / 1e9:.2f} GFLOP/step; peak "
                        f"{self.peak / 1e9:.1f} GFLOP/s ({self.peak_source})")
    spec = lora.spec_from_config(self.config.model)
    if spec is not None:
      modules = lora.adapter_modules(ts.full_params(self.state))
      self.writer.console(
          f"LoRA: rank {spec.rank}, alpha {spec.alpha:g}, scale {spec.scale:.4g}"
          f"{' (rsLoRA)' if spec.rslora else ''}, dropout {spec.dropout:g} on {len(modules)} "
          f"modules ({','.join(spec.targets)}); stage {self.config.train.stage}")
    return int(self.state["step"])

  def save(self, step: int, force: bool = False) -> bool:
    return self.checkpointer.save(step, self.state, self.loader.get_state(), self.config.to_dict(),
                                  force=force)

  # -- logging

  def log(self, step: int, acc) -> dict[str, float]:
    summary = acc.summary()
    if not summary:
      return {}
    summary["mfu"] = flops.mfu(self.flops_per_step, summary["step_seconds"], self.peak)
    bad = global_bad_record_counts(self.loader.bad_record_counts())  # a collective: once per log
    summary["bad_records"] = float(sum(bad.values()))
    for reason, n in bad.items():
      summary[f"bad_records/{reason}"] = float(n)
    self.writer.console(metrics.progress_line(step, self.config.train.steps, summary))
    self.writer.write(step, "train", summary)
    return summary

  # -- evaluation

  def evaluate(self, step: int, final: bool = False) -> dict[str, Any]:
    cfg = self.config
    params = ts.full_params(self.state)
    out: dict[str, Any] = {}
    if cfg.data.eval_manifest:
      batches = pipeline.make_eval_batches(cfg)
      out.update(evaluate.eval_loss(self.program, params, batches, cfg.train.eval_batches))
      batches.close()
      n = cfg.train.asr_eval_samples
      if n:
        out.update(self._asr_scores(params, cfg.data.eval_manifest, n, "", "eval"))
    if final and cfg.train.final_train_asr_samples:
      manifest = cfg.data.train_manifests.split(",")[0]
      out.update(self._asr_scores(params, manifest, cfg.train.final_train_asr_samples, "train_",
                                  "train"))
    if out:
      scalars = {k: v for k, v in out.items() if isinstance(v, (int, float))}
      self.writer.write(step, "eval", scalars)
      self.writer.console(f"eval @ {step}: " + ", ".join(
          f"{k} {v:.4f}" for k, v in scalars.items() if k == "loss" or "cer" in k or "wer" in k
          or k.startswith("loss/")))
    return out

  def _asr_scores(self, params, manifest: str, samples: int, prefix: str,
                  label: str) -> dict[str, Any]:
    """Greedy ASR of the first `samples` asr records of `manifest`, scored by the same code as
    `python -m moss_jax.evaluate` (prefix + cer / wer / asr_samples)."""
    cfg = self.config
    loaded = generate.Loaded(self.program.model, params, cfg,
                             tokenizers.load_tokenizer(cfg.data.tokenizer))
    report, records = evaluate.score_manifest(
        loaded, manifest, self.mesh, tasks=("asr",), max_samples=samples,
        batch_size=max(1, cfg.data.batch_size),
        max_new_tokens=cfg.train.generate_max_tokens)
    asr = report["tasks"].get("asr", {"samples": 0, "cer": float("nan"), "wer": float("nan")})
    for rec in [r for r in records if r.error is None][:3]:
      self.writer.console(f"  {label} ref: {rec.reference!r}\n  {label} hyp: {rec.hypothesis!r}")
    return {f"{prefix}cer": asr["cer"], f"{prefix}wer": asr["wer"],
            f"{prefix}asr_samples": asr["samples"]}

  # -- loop

  def _stopped_before_first_step(self, step: int, last: dict) -> dict[str, Any]:
    self.writer.console("stopped by signal before the first step; nothing to save, rerun the "
                        "same command to start")
    return not_started(step, last)

  def train(self) -> dict[str, Any]:
    cfg = self.config.train
    t_start = time.perf_counter()
    try:
      # With cores to spare, the train step compiles while the parameters are initialised or
      # restored; otherwise once they are, which starts the first step sooner there.
      overlap = ts.compile_overlaps_init()
      if overlap:
        self.program.compile_step_in_background()
      step = self.restore_or_init()  # compiles the init (and waits for nothing else)
      if not overlap:
        self.program.compile_step_in_background()
    except distributed.Stopped:
      return self._stopped_before_first_step(0, {})
    start_step = step
    acc = metrics.Accumulator()
    max_skips = cfg.max_consecutive_skips
    pending = None  # previous step's metrics: read one step late so the host never waits
    last_summary: dict[str, float] = {}
    preempted = False
    # From here a signal normally waits for the end of the step, which is then checkpointed.
    # Waits without bound are cut short (see StopSignal): for data (the loader's state is that of
    # the batches handed out, so the checkpoint stays exact) and for evaluation. With several
    # processes they are not, since all processes must reach the same step to save together.
    self.stop.set_interruptible(False)
    cut_short = (self.stop.interruptible if jax.process_count() == 1 else
                 contextlib.nullcontext)
    try:
      while step < cfg.steps:
        with cut_short():
          batch = next(self.loader)  # already on the devices (DevicePrefetch)
        self.profiler.before_step(step + 1)
        # The first step compiles (minutes on large models) and may be cut short too: the state
        # before it is the checkpoint just restored (or step 0), so nothing is lost.
        with (cut_short() if step == start_step else contextlib.nullcontext()):
          self.state, m = self.program.step(self.state, batch)
        step += 1
        self.profiler.after_step(step, m)
        acc.add(m)
        if step == start_step + 1 and start_step == 0:
          self.first_loss = float(m["loss"])  # logged on its own: the reference for the demo drop
          self.writer.write(step, "train_first", {"loss": self.first_loss})
        self._stop_if_diverged(step - 1, pending, max_skips)
        pending = m
        if step % cfg.log_every == 0 or step == cfg.steps:
          last_summary = self.log(step, acc) or last_summary
        self.checkpointer.check()  # a failed background save stops the run at this step
        self.save(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
          t_eval = time.perf_counter()
          with self.watchdog.paused(), cut_short():
            self.evaluate(step)
          acc.exclude(time.perf_counter() - t_eval)
        self.watchdog.beat(step)
        if self.stop.should_stop(step):
          preempted = True
          break
    except distributed.Stopped:
      preempted = True
    if preempted and step == start_step:
      return self._stopped_before_first_step(step, last_summary)
    self._stop_if_diverged(step, pending, max_skips)
    self.save(step, force=True)
    self.checkpointer.wait()
    result = {"step": step, "preempted": preempted, "last": last_summary,
              "first_loss": self.first_loss or self._first_loss_from_log()}
    if preempted:
      self.writer.console(f"stopped by signal at step {step}; checkpoint written, rerun the "
                          "same command to resume")
    else:
      self.stop.set_interruptible(True)  # the checkpoint is written: evaluation may be cut short
      try:
        result["eval"] = self.evaluate(step, final=True)
      except distributed.Stopped:
        self.writer.console(f"stopped by signal during the final evaluation; step {step} is "
                            "saved")
        result["preempted"] = True
        return result
      result["wall_seconds"] = time.perf_counter() - t_start
      self._final_report(result)
      if cfg.export_at_end and self.is_main:
        r = export.export_run(str(self.workdir), str(self.workdir / "hf"), step=step,
                              overwrite=True)
        self.writer.console(f"exported step {step} to {r.output_dir}")
    return result

  def _stop_if_diverged(self, step: int, m, max_skips: int) -> None:
    """Raises once `max_skips` updates in a row were skipped (m: the metrics of `step`, read one
    step late so the host never waits for the device)."""
    if m is None or int(m["consecutive_skipped"]) < max_skips:
      return
    self.checkpointer.wait()
    raise TrainingDiverged(
        f"{int(m['consecutive_skipped'])} consecutive updates had a non-finite loss or gradient "
        f"(at step {step}; {int(m['skipped_total'])} skipped in total). Lower optim.lr, check the "
        "data, or raise train.max_consecutive_skips. The last good checkpoint is in "
        f"{self.checkpointer.directory}.")

  def _first_loss_from_log(self) -> float | None:
    path = self.workdir / "metrics.jsonl"
    if not path.exists():
      return None
    for line in path.read_text().splitlines():
      rec = json.loads(line)
      if rec.get("split") == "train_first":
        return float(rec["loss"])
    return None

  def _final_report(self, result: dict[str, Any]) -> None:
    first, last = result["first_loss"], result["last"].get("loss")
    lines = [f"done: {result['step']} steps in {result['wall_seconds']:.0f} s"]
    if first is not None and last is not None:
      drop = 100.0 * (first - last) / first if first else float("nan")
      result["loss_drop_percent"] = drop
      lines.append(f"loss: first {first:.4f} -> last {last:.4f} ({drop:.1f}% lower)")
    ev = result.get("eval", {})
    if "train_cer" in ev:
      lines.append(f"greedy ASR on {ev['train_asr_samples']} training clips: CER "
                   f"{100 * ev['train_cer']:.1f}%  WER {100 * ev['train_wer']:.1f}%")
    if "cer" in ev:
      lines.append(f"greedy ASR on {ev['asr_samples']} eval clips: CER {100 * ev['cer']:.1f}%  "
                   f"WER {100 * ev['wer']:.1f}%")
    if "loss" in ev:
      lines.append(f"eval loss {ev['loss']:.4f}")
    for line in lines:
      self.writer.console(line)
    if self.is_main:
      (self.workdir / "result.json").write_text(json.dumps(
          {k: v for k, v in result.items() if k != "eval"} | {
              "eval": {k: v for k, v in ev.items() if isinstance(v, (int, float))}}, indent=2))

  def close(self) -> None:
    """Releases what set-up got to (it may have stopped part way)."""
    try:
      for part in (self.profiler, self.watchdog, self.checkpointer):
        if part is not None:
          part.close()
    finally:
      for part in (self.loader, self.writer):
        if part is not None:
          part.close()
      if self.lock is not None:
        self.lock.release()
      self.stop.restore()


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final summary."""
  try:
    run = Run(config, workdir)
  except distributed.Stopped:
    print("stopped by signal during set-up; nothing to save, rerun the same command to start",
          flush=True)
    return not_started(0, {})
  try:
    return run.train()
  finally:
    run.close()


def main(argv) -> None:
  del argv  # cli.run rejects stray arguments
  cli.require("config", "workdir")
  host_memory.retain_freed_memory_on_cpu()  # before JAX starts its backend
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         mode=_DISTRIBUTED.value, timeout_s=_DISTRIBUTED_TIMEOUT.value)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if not result.get("started", True):
    # Stopped before the first step: XLA may still be compiling (the init, the train step) on its
    # own threads, and the interpreter's teardown would free JAX's client under them.
    cli.exit_without_teardown(0)


if __name__ == "__main__":
  cli.run(main)
