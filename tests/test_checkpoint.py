"""Orbax checkpoints: round trip, half-written steps skipped, restore onto another mesh shape."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from moss_jax import checkpoint
from moss_jax import sharding
from moss_jax import train_step as ts
from test_train_helpers import tiny_config


def _program(mesh_shape):
  c = tiny_config(mesh=mesh_shape)
  return ts.build_program(c, sharding.make_mesh(c.mesh))


@pytest.fixture(scope="module")
def trained():
  """A program on an 8x1x1 mesh and its state after two steps."""
  prog = _program((8, 1, 1))
  state = prog.init_state(jax.random.key(0))
  for seed in range(2):
    state, _ = prog.step(state, prog.global_batch(ts.synthetic_batch(prog.config, seed=seed)))
  return prog, state


def _assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(jax.device_get(a))
  flat_b, tree_b = jax.tree.flatten(jax.device_get(b))
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_state_data_state_and_config(trained, tmp_path):
  prog, state = trained
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=2)
  assert ckpt.save(2, state, {"position": 17}, {"optim": {"lr": 0.5}})
  assert not ckpt.save(3, state)  # not a multiple of `every`
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=2)
  restored = ckpt.restore(prog.abstract_state)
  ckpt.close()
  assert restored.step == 2
  assert restored.data_state == {"processes": [{"position": 17}]}
  assert restored.config == {"optim": {"lr": 0.5}}
  _assert_trees_equal(state, restored.state)


def test_half_written_and_unreadable_checkpoints(trained, tmp_path):
  prog, state = trained
  root = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(root), every=2, async_save=False)
  ckpt.save(2, state, {"at": 2})
  ckpt.close()
  # A crash mid-save leaves Orbax's temporary directory, which is not a step.
  shutil.copytree(root / "2", root / "4.orbax-checkpoint-tmp-1234")
  # A step that looks committed but whose arrays are gone (e.g. a disk that lost files).
  shutil.copytree(root / "2", root / "6")
  shutil.rmtree(root / "6" / "state" / "d")
  assert checkpoint.complete_steps(root) == [2, 6]

  ckpt = checkpoint.Checkpointer(str(root), every=2)
  restored = ckpt.restore(prog.abstract_state)  # 6 fails to read: set aside, falls back to 2
  assert restored.step == 2 and restored.data_state == {"processes": [{"at": 2}]}
  _assert_trees_equal(state["params"], restored.state["params"])
  assert not (root / "6").exists()
  assert len([p for p in root.iterdir() if p.name.startswith("6.unreadable-")]) == 1
  assert checkpoint.complete_steps(root) == [2]
  # The redone step 6 is saved afresh (not skipped as "already saved").
  assert ckpt.save(6, state, {"at": 6})
  ckpt.close()
  assert checkpoint.complete_steps(root) == [2, 6]


def test_data_state_with_wrong_content_falls_back(trained, tmp_path):
  prog, state = trained
  root = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(root), every=2, async_save=False)
  ckpt.save(2, state, {"at": 2})
  ckpt.save(4, state, {"at": 4})
  ckpt.close()
  (root / "4" / "data" / "process_0-of-1.json").write_text("[1, 2]")  # valid JSON, wrong content
  ckpt = checkpoint.Checkpointer(str(root), every=2)
  restored = ckpt.restore(prog.abstract_state)
  ckpt.close()
  assert restored.step == 2


@pytest.mark.slow
def test_restore_onto_a_different_mesh_shape(trained, tmp_path):
  prog8, state = trained
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1)
  ckpt.save(2, state, {})
  ckpt.close()

  prog24 = _program((2, 4, 1))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1)
  restored = ckpt.restore(prog24.abstract_state)
  ckpt.close()
  _assert_trees_equal(state, restored.state)
  for leaf, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(prog24.state_shardings)):
    assert leaf.sharding == want
  # fsdp=1 leaves the 8x1x1 parameters whole on each device; on 2x4x1 they are cut in 4.
  assert any(s24.shard_shape(x.shape) != s8.shard_shape(x.shape)
             for x, s24, s8 in zip(jax.tree.leaves(state), jax.tree.leaves(prog24.state_shardings),
                                   jax.tree.leaves(prog8.state_shardings)))

  batch = ts.synthetic_batch(prog8.config, seed=5)
  _, m8 = prog8.step(jax.tree.map(lambda x: x.copy(), state), prog8.global_batch(batch))
  _, m24 = prog24.step(restored.state, prog24.global_batch(batch))
  np.testing.assert_allclose(float(m8["loss"]), float(m24["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m8["grad_norm"]), float(m24["grad_norm"]), rtol=1e-4)


def test_restore_params_across_stages(trained, tmp_path):
  """A stage-1 style checkpoint (other trainable split) gives the whole tree back."""
  prog, state = trained
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1)
  ckpt.save(2, state, {})
  ckpt.close()
  params = checkpoint.restore_params(str(tmp_path / "ckpt"), prog.abstract_params)
  _assert_trees_equal(ts.full_params(state), params)


def test_restore_params_falls_back_and_warns_about_nothing(trained, tmp_path, caplog):
  """generate/export read through the same fallback as training, without Orbax's warnings."""
  prog, state = trained
  root = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(root), every=2)
  ckpt.save(2, state, {})
  ckpt.save(4, jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x, state), {})
  ckpt.close()
  with caplog.at_level("WARNING"):
    params = checkpoint.restore_params(str(root), prog.abstract_params)
  assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]
  assert checkpoint.latest_complete_step(root) == 4
  shutil.rmtree(root / "4" / "state" / "d")
  params = checkpoint.restore_params(str(root), prog.abstract_params)
  _assert_trees_equal(ts.full_params(state), params)  # step 2's
  assert [p.name.split("-")[0] for p in root.iterdir() if "unreadable" in p.name] == [
      "4.unreadable"]
  with pytest.raises(checkpoint.NoCheckpoint):
    checkpoint.restore_params(str(tmp_path / "nothing"), prog.abstract_params)
