"""The loss convention, the jitted train step, gradient accumulation, the NaN guard and stages."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax import batch as batch_lib
from moss_jax import optim
from moss_jax import sharding
from moss_jax import train_step as ts
from test_train_helpers import run_config, tiny_config


def _program(**kw):
  c = tiny_config(**kw)
  return ts.build_program(c, sharding.make_mesh(c.mesh))


@pytest.fixture(scope="module")
def full_program():
  return _program()


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_token_stats_follow_reference_shift_and_ignore():
  vocab = 5
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, vocab)).astype(np.float32)
  labels = np.array([[-100, 3, 1, -100], [-100, -100, 4, 0]], np.int32)
  tasks = np.array([[0, 0, 0, 0], [2, 2, 2, 2]], np.int32)
  stats = jax.device_get(ts.token_stats(jnp.asarray(logits), jnp.asarray(labels),
                                        jnp.asarray(tasks), z_loss=1e-3))
  # Expected by hand: logits[t-1] predicts labels[t].
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  pairs = [(0, 0, 3), (0, 1, 1), (1, 1, 4), (1, 2, 0)]  # (row, logit position, target)
  nll = {p: -logp[p[0], p[1], p[2]] for p in pairs}
  np.testing.assert_allclose(stats["ce_sum"], sum(nll.values()), rtol=1e-5)
  assert stats["tokens"] == 4
  np.testing.assert_allclose(stats["task_ce_sum"][0], nll[pairs[0]] + nll[pairs[1]], rtol=1e-5)
  np.testing.assert_allclose(stats["task_ce_sum"][2], nll[pairs[2]] + nll[pairs[3]], rtol=1e-5)
  np.testing.assert_array_equal(stats["task_tokens"], [2, 0, 2, 0, 0])
  correct = sum(int(np.argmax(logits[r, t]) == y) for r, t, y in pairs)
  assert stats["correct"] == correct
  logz = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(stats["z_loss_sum"],
                             1e-3 * sum(logz[r, t] ** 2 for r, t, _ in pairs), rtol=1e-5)


def test_schedules():
  c = tiny_config()
  c.optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  for kind, mid, end in (("cosine", 0.55, 0.1), ("linear", 0.55, 0.1), ("constant", 1.0, 1.0)):
    c.optim.schedule = kind
    s = optim.make_schedule(c.optim, total_steps=110)
    np.testing.assert_allclose(float(s(0)), 0.1, rtol=1e-6)  # first update already moves
    np.testing.assert_allclose(float(s(9)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), mid, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), end, rtol=1e-5)
    np.testing.assert_allclose(float(s(500)), end, rtol=1e-5)


def test_stage_masks_split_the_tree(full_program):
  params = full_program.abstract_params
  for stage, expect_trained in (("adapter", {"audio_adapter", "deepstack_audio_merger_list_0",
                                             "deepstack_audio_merger_list_1"}),
                                ("encoder_frozen", set(params) - {"audio_encoder"}),
                                ("full", set(params))):
    trainable, frozen = optim.split_for_stage(params, stage)
    assert set(trainable) == expect_trained
    assert set(frozen) == set(params) - expect_trained
    merged = optim.merge(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_train_step_learns_and_skips_non_finite_batches(full_program):
  prog = full_program
  c = prog.config
  state = prog.init_state(jax.random.key(0))
  batch = ts.synthetic_batch(c, seed=1)
  losses = []
  for _ in range(4):
    state, m = prog.step(state, prog.global_batch(batch))
    losses.append(float(m["loss"]))
    assert int(m["finite"]) == 1
  assert losses[-1] < losses[0]
  assert int(state["step"]) == 4 and int(state["skipped_total"]) == 0

  before = jax.device_get(state)
  bad = dict(batch)
  bad["audio_mel"] = batch["audio_mel"].copy()
  bad["audio_mel"][0, 0, 5, 7] = np.nan
  state, m = prog.step(state, prog.global_batch(bad))
  assert int(m["finite"]) == 0 and not np.isfinite(float(m["loss"]))
  assert int(state["skipped_total"]) == 1 and int(state["consecutive_skipped"]) == 1
  assert int(state["step"]) == 5
  assert _leaves_equal(before["params"], state["params"])
  assert _leaves_equal(before["opt_state"], state["opt_state"])

  state, m = prog.step(state, prog.global_batch(batch))
  assert int(m["finite"]) == 1 and np.isfinite(float(m["loss"]))
  assert int(state["consecutive_skipped"]) == 0 and int(state["skipped_total"]) == 1
  assert not _leaves_equal(before["params"], state["params"])


def test_metrics_count_tokens_and_tasks(full_program):
  prog = full_program
  batch = ts.synthetic_batch(prog.config, seed=2)
  state = prog.init_state(jax.random.key(1))
  _, m = prog.step(state, prog.global_batch(batch))
  m = jax.device_get(m)
  labels, tasks = batch["labels"][:, 1:], batch["task_ids"][:, 1:]
  valid = labels != batch_lib.IGNORE_INDEX
  assert m["tokens"] == valid.sum()
  np.testing.assert_array_equal(m["task_tokens"],
                                [(valid & (tasks == t)).sum() for t in range(len(batch_lib.TASKS))])
  np.testing.assert_allclose(m["task_ce_sum"].sum(), m["ce_sum"], rtol=1e-5)
  np.testing.assert_allclose(m["loss"], m["ce_sum"] / m["tokens"], rtol=1e-6)
  assert m["input_tokens"] == (batch["segment_ids"] > 0).sum()
  np.testing.assert_allclose(m["audio_seconds"], batch["audio_chunk_frames"].sum() / 100.0)


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(full_program):
  accum = _program(grad_accum=2)
  batch = ts.synthetic_batch(full_program.config, seed=4)
  params = jax.device_get(full_program.init_state(jax.random.key(2))["params"])
  s1, m1 = full_program.step(full_program.state_from_params(params), full_program.global_batch(batch))
  s2, m2 = accum.step(accum.state_from_params(params), accum.global_batch(batch))
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # Adam step 1 ~ lr * sign(g)


@pytest.mark.slow
def test_stage1_trains_only_adapter_and_mergers():
  prog = _program(stage="adapter")
  state = prog.init_state(jax.random.key(3))
  assert set(state["params"]) == {"audio_adapter", "deepstack_audio_merger_list_0",
                                  "deepstack_audio_merger_list_1"}
  # The optimizer state holds moments for the trainable half only.
  n_trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
  n_moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
  assert n_moments == 2 * n_trainable
  before = jax.device_get(ts.full_params(state))
  for seed in range(3):
    state, m = prog.step(state, prog.global_batch(ts.synthetic_batch(prog.config, seed=seed)))
    assert int(m["finite"]) == 1
  after = jax.device_get(ts.full_params(state))
  for frozen in ("audio_encoder", "language_model", "lm_head"):
    assert _leaves_equal(before[frozen], after[frozen]), frozen
  for trained in state["params"]:
    assert not _leaves_equal(before[trained], after[trained]), trained


def test_tokenizer_must_fit_the_embedding():
  from moss_jax import train
  from moss_jax.config_validation import ConfigError
  c = tiny_config()
  c.model.text.vocab_size = 100  # the sample corpus tokenizer has 512 pieces
  with pytest.raises(ConfigError, match="needs 512 embedding rows"):
    train.check_tokenizer(c)


def test_initialisation_from_reference_format_directories(full_program, tmp_path):
  """train.init_from loads the whole model, train.init_encoder_from only the encoder."""
  from moss_jax import hf, train
  from moss_jax.model import init_params
  prog = full_program
  c = prog.config
  saved = init_params(c.model, jax.random.key(7))
  hf.save_pretrained(str(tmp_path / "ref"), prog.model, saved, dtype=jnp.float32)

  whole = tiny_config()
  whole.train.init_from = str(tmp_path / "ref")
  params = train.initial_params(whole, prog)
  assert _leaves_equal(saved, params)

  enc = tiny_config()
  enc.train.init_encoder_from = str(tmp_path / "ref")
  params = train.initial_params(enc, prog)
  assert _leaves_equal(saved["audio_encoder"], params["audio_encoder"])
  fresh = init_params(c.model, jax.random.key(c.train.seed))
  assert _leaves_equal(fresh["language_model"], params["language_model"])
  assert not _leaves_equal(saved["language_model"], params["language_model"])


def test_step_compiled_in_background_matches_the_jitted_step(caplog):
  ahead, plain = _program(), _program()
  ahead.compile_step_in_background()
  thread = ahead._compiling[0]
  ahead.compile_step_in_background()  # already started: starts nothing
  assert ahead._compiling[0] is thread
  batch = ts.synthetic_batch(ahead.config, seed=5)
  states = [p.init_state(jax.random.key(0)) for p in (ahead, plain)]
  outs = [p.step(s, p.global_batch(batch)) for p, s in zip((ahead, plain), states)]
  assert ahead._compiled_step is not None  # the step ran the executable compiled ahead
  assert _leaves_equal(outs[0], outs[1])
  # An executable that refuses the real arguments (compiled for another batch shape here) is
  # dropped with a warning, and the jitted step runs instead.
  odd = _program()
  odd.abstract_batch = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((a.shape[0] * 2,) + a.shape[1:], a.dtype, sharding=a.sharding),
      odd.abstract_batch)
  odd.compile_step_in_background()
  out = odd.step(odd.init_state(jax.random.key(0)), odd.global_batch(batch))
  assert odd._compiled_step is None
  assert "refused the arguments" in caplog.text
  assert _leaves_equal(out, outs[1])


@pytest.mark.parametrize("cores,overlapped", [(2, False), (64, True)])
def test_run_compiles_the_step_during_the_init_only_with_cores_to_spare(tmp_path, monkeypatch,
                                                                        cores, overlapped):
  """A few-core host compiles the train step once the parameters exist (the two compiles only
  contend there); a many-core host starts it before, so it overlaps the init or a restore.
  Either way the steps run the executable compiled ahead."""
  from moss_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(ts.os, "sched_getaffinity", lambda pid: set(range(cores)))
  run = train_lib.Run(run_config({"train.steps": 2}), str(tmp_path / "run"))
  compiling_during_init = []
  real_init = run.restore_or_init

  def init():
    compiling_during_init.append(run.program._compiling is not None)
    return real_init()

  monkeypatch.setattr(run, "restore_or_init", init)
  try:
    result = run.train()
  finally:
    run.close()
  assert compiling_during_init == [overlapped]
  assert result["step"] == 2
  assert run.program._compiled_step is not None  # the steps ran the executable compiled ahead


_COMPILES_AFTER_THE_START = r'''
import json
import jax
from test_train_helpers import tiny_config
from moss_jax import sharding, train_step as ts
from moss_jax.model import init_params
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: compiles.append(name) if name.endswith("backend_compile_duration")
    else None)
c = tiny_config()
out = {}
for ahead in (False, True):  # the plain program first: nothing of it is compiled before
  prog = ts.build_program(c, sharding.make_mesh(c.mesh))
  if ahead:
    prog.compile_step_in_background()
    prog._compiling[0].join()  # the train step, then create_state and the eval step
  params = init_params(c.model, jax.random.key(0), prog.mesh)
  before = len(compiles)
  state = prog.state_from_params(params)
  after_state = len(compiles)
  prog.evaluate(ts.full_params(state), prog.global_batch(ts.synthetic_batch(c, seed=1)))
  out[str(ahead)] = [after_state - before, len(compiles) - after_state]
print(json.dumps(out))
'''


def test_background_thread_also_compiles_create_state_and_the_eval_step():
  """The programs a run needs after the train step (the fresh state's, the eval step) are
  compiled in the background thread too: their first calls then compile nothing."""
  import json
  import os
  import subprocess
  import sys
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compiles in this process only: none loaded
  proc = subprocess.run([sys.executable, "-c", _COMPILES_AFTER_THE_START], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # [create_state compiles, eval step compiles] at their first calls: without / with the thread.
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"False": [1, 1], "True": [0, 0]}


def test_first_step_does_not_wait_for_the_programs_compiled_after_it(monkeypatch):
  """The background thread goes on to the eval step's compile after the train step's; the first
  step runs as soon as the train step is ready (here the later compiles are held until then)."""
  prog = _program()
  release = threading.Event()
  monkeypatch.setattr(prog, "_compile_next_programs", lambda: release.wait(120))
  prog.compile_step_in_background()
  thread = prog._compiling[0]
  try:
    state = prog.init_state(jax.random.key(0))
    _, m = prog.step(state, prog.global_batch(ts.synthetic_batch(prog.config, seed=5)))
    assert np.isfinite(float(m["loss"]))
    assert thread.is_alive()  # the step ran while the thread still held the later compiles
  finally:
    release.set()
    thread.join()
