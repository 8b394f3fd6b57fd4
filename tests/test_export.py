"""`python -m moss_jax.export`: training runs to the reference format and back.

A tiny run is trained a few steps (in this process, saved by the training Checkpointer), exported,
and the export is loaded strictly by the PyTorch reference (tests/torch_reference.py), whose
logits must match the JAX model's on the checkpoint's parameters. Run with `pytest -s` to see the
measured differences.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from etils import epath
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

import torch_reference as tr
from moss_jax import checkpoint, export, hf, paths, sharding, train
from moss_jax import train_step as ts
from moss_jax.errors import UserError
from moss_jax.hf import io, mapping
from moss_jax.hf import peft as peft_io
from moss_jax.model import MossAudioModel, init_params, lora
from test_gcs import BUCKET, _drop_listing_cache, gcs  # noqa: F401  (gcs: a fixture)
from test_train_helpers import (REPO, run_config, tiny_config, train_command, train_env,
                                write_run_config)

pytestmark = pytest.mark.usefixtures("fast_compiles")
torch.set_num_threads(1)

STEPS = 3
TOL = 1e-4  # float32 export: max abs logit difference
# bfloat16 export: max abs logit difference relative to the largest |logit| (README states it).
BF16_REL_TOL = 2e-2


def _train(workdir, stage: str = "full", steps: int = STEPS, mesh=(1, -1, 1), overrides=None):
  """A run directory as `train` leaves it: config.json + checkpoints/STEP (params, frozen,
  optimizer state), trained `steps` steps on synthetic batches."""
  config = run_config({"train.stage": stage, "mesh.shape": list(mesh), **(overrides or {})})
  prog = ts.build_program(config, sharding.make_mesh(config.mesh))
  state = prog.init_state(jax.random.key(0))
  for seed in range(steps):
    state, _ = prog.step(state, prog.global_batch(ts.synthetic_batch(config, seed=seed)))
  train.write_config(config, str(workdir))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, async_save=False)
  for step in sorted({1, steps}):  # an older step too, so a missing step has others to list
    ckpt.save(step, state, {}, config.to_dict(), force=True)
  ckpt.close()
  return config, state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config, state = _train(workdir)
  return str(workdir), config, jax.device_get(ts.full_params(state))


def _case(audio_token_id: int, vocab: int, seed: int = 0):
  """Token ids with one 5 s clip's placeholders and its mel."""
  rng = np.random.default_rng(seed)
  frames = 500  # two chunks, the second short (its padding reaches the conv stem)
  n_audio = -(-frames // 8)
  ids = np.concatenate([rng.integers(10, vocab, 5), [audio_token_id] * n_audio,
                        rng.integers(10, vocab, 20)])[None].astype(np.int64)
  mel = np.clip(rng.normal(0.0, 0.5, (1, 128, frames)), -1.5, 1.5).astype(np.float32)
  return ids, mel, np.array([frames])


def _torch_model(out_dir) -> tr.TorchMossAudio:
  """The reference model built from an export's config.json, weights loaded strictly."""
  config = json.loads(open(os.path.join(out_dir, "config.json")).read())
  proc = json.loads(open(os.path.join(out_dir, "processor_config.json")).read())
  model = tr.TorchMossAudio(config, audio_token_id=proc["audio_token_id"])
  state = {}
  files = [n for n in os.listdir(out_dir) if n.endswith(".safetensors")]
  for name in files:
    state.update({k: v.float() for k, v in load_file(os.path.join(out_dir, name)).items()})
  model.load_state_dict(state, strict=True)
  return model.eval()


_JAX_LOGITS = {}


def _logit_diff(run, out_dir):
  """Max abs difference of the reference model on an export vs the JAX model on the run."""
  _, config, params = run
  proc = json.loads(open(os.path.join(out_dir, "processor_config.json")).read())
  ids, mel, lengths = _case(proc["audio_token_id"], config.model.text.vocab_size)
  with torch.no_grad():
    want = _torch_model(out_dir)(torch.from_numpy(ids), torch.from_numpy(mel),
                                 torch.from_numpy(lengths)).numpy()
  if id(params) not in _JAX_LOGITS:  # one compile for the float32 and bfloat16 tests
    _JAX_LOGITS[id(params)] = np.asarray(hf.reference_logits(
        MossAudioModel(config=config.model), params, ids, mel, lengths,
        audio_token_id=proc["audio_token_id"]))
  got = _JAX_LOGITS[id(params)]
  return float(np.abs(got - want).max()), float(np.abs(got).max())


def test_float32_export_loads_strictly_into_pytorch_with_the_same_logits(run, tmp_path):
  workdir, config, params = run
  out = str(tmp_path / "out")
  r = export.export_run(workdir, out, dtype="float32")
  assert r.step == STEPS and r.files == ["model.safetensors"]
  names = sorted(os.listdir(out))
  assert {"config.json", "processor_config.json", "generation_config.json", "model.safetensors",
          "tokenizer.model", export.RUN_CONFIG_IN_EXPORT} <= set(names)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left behind
  proc = json.loads(open(os.path.join(out, "processor_config.json")).read())
  hf_config = json.loads(open(os.path.join(out, "config.json")).read())
  # The run's sentencepiece tokenizer defines the special ids; no remote code, so no auto_map.
  assert (proc["audio_token_id"], proc["audio_start_id"], proc["audio_end_id"]) == (3, 4, 5)
  assert proc["enable_time_marker"] is True
  assert "auto_map" not in hf_config and "auto_map" not in proc
  with open(os.path.join(out, export.RUN_CONFIG_IN_EXPORT)) as f:
    assert json.load(f)["train"]["steps"] == config.train.steps
  diff, scale = _logit_diff(run, out)
  print(f"\nfloat32 export: max abs logit diff {diff:.2e} (logit scale {scale:.2f})")
  assert diff <= TOL


def test_bfloat16_sharded_export_matches_within_the_stated_tolerance(run, tmp_path):
  workdir, _, params = run
  out = str(tmp_path / "out")
  r = export.export_run(workdir, out, max_shard_size="100KB")
  assert len(r.files) > 1
  index = json.loads(open(os.path.join(out, io.INDEX_FILE)).read())
  assert set(index["weight_map"].values()) == set(r.files)
  assert index["metadata"]["total_size"] == r.tensor_bytes
  assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "bfloat16"
  diff, scale = _logit_diff(run, out)
  print(f"\nbfloat16 export: max abs logit diff {diff:.2e} = {diff / scale:.2e} of the logit "
        f"scale {scale:.2f}")
  assert diff <= BF16_REL_TOL * scale


def test_stage1_run_exports_both_halves_merged(tmp_path):
  workdir = tmp_path / "stage1"
  config, state = _train(workdir, stage="adapter", steps=1)
  assert set(state["params"]) == {"audio_adapter", "deepstack_audio_merger_list_0",
                                  "deepstack_audio_merger_list_1"}
  assert {"audio_encoder", "language_model", "lm_head"} <= set(state["frozen"])
  export.export_run(str(workdir), str(tmp_path / "out"), dtype="float32")
  _, loaded = hf.load_pretrained(str(tmp_path / "out"))
  want = jax.device_get(ts.full_params(state))
  flat_w, flat_l = jax.tree_util.tree_leaves_with_path(want), dict(
      jax.tree_util.tree_leaves_with_path(loaded))
  assert len(flat_w) == len(flat_l)
  for path, value in flat_w:
    np.testing.assert_array_equal(np.asarray(flat_l[path]), value, err_msg=str(path))


def _tensors(directory) -> dict[str, np.ndarray]:
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      out.update({k: v.float().numpy()
                  for k, v in load_file(os.path.join(directory, name)).items()})
  return out


def test_a_lora_run_exports_its_merged_weights_and_its_peft_adapter(tmp_path):
  workdir = tmp_path / "lora"
  config, state = _train(workdir, stage="lora", steps=2, overrides={
      "model.lora.rank": 4, "model.lora.alpha": 8.0,
      "model.lora.targets": "llm,adapter,encoder_qkv,lm_head"})
  params = jax.device_get(ts.full_params(state))
  assert lora.has_adapters(state["params"]) and not lora.has_adapters(state["frozen"])
  out, peft_dir = tmp_path / "merged", tmp_path / "adapter"
  export.export_run(str(workdir), str(out), dtype="float32", peft_adapter_dir=str(peft_dir))
  # What merge_adapters + save_pretrained write from the whole tree in memory.
  want_dir = tmp_path / "want"
  merged = lora.merge_adapters(params, config.model)
  io.save_pretrained(str(want_dir), MossAudioModel(lora.base_model_config(config.model)), merged,
                     dtype=np.float32)
  got, want = _tensors(out), _tensors(want_dir)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
  # The adapters moved the weights (else this test could not tell merged from base).
  base = _tensors_of(lora.split(params)[0], config)
  moved = [k for k in want if np.abs(want[k] - base[k]).max() > 1e-4]
  assert any("q_proj" in k for k in moved) and any("lm_head" in k for k in moved)
  hf_config = json.loads((out / "config.json").read_text())
  assert "lora" not in json.dumps(hf_config)
  _torch_model(str(out))  # loads strictly into the reference
  # The PEFT adapter is the one hf.peft writes from the tree in memory.
  peft_want = tmp_path / "peft_want"
  peft_io.save_adapter(str(peft_want), params, config.model)
  assert (json.loads((peft_dir / peft_io.ADAPTER_CONFIG).read_text())
          == json.loads((peft_want / peft_io.ADAPTER_CONFIG).read_text()))
  a, b = _tensors(peft_dir), _tensors(peft_want)
  assert set(a) == set(b) and a
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _tensors_of(params, config) -> dict[str, np.ndarray]:
  """{reference name: float32 tensor} of a base tree, via the one name table."""
  scanned = mapping.tree_is_scanned(params)
  out = {}
  for e in mapping.entries(lora.base_model_config(config.model), scanned):
    leaf = np.asarray(mapping.get_leaf(params, e.flax_path), np.float32)
    x = leaf[e.stack_index] if e.stack_index is not None else leaf
    out[e.hf_key] = np.asarray(mapping.to_hf(e.transform, x))
  return out


def _export_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "moss_jax.export", *args], capture_output=True,
                        text=True, timeout=300, env=env or train_env("/tmp"), **kw)


def test_reference_dir_from_hf_and_back_is_byte_identical(tmp_path):
  torch.manual_seed(0)
  ref = tr.TorchMossAudio(tr.tiny_reference_config(audio_token_id=7))
  tr.randomize_(ref, seed=1)
  ref_dir = str(tmp_path / "ref")
  tr.save_reference_checkpoint(ref, ref_dir)
  cfg = write_run_config(tmp_path / "cfg")
  run_dir, out = str(tmp_path / "run"), str(tmp_path / "out")
  proc = _export_cli("--from_hf", ref_dir, "--output_dir", run_dir, f"--config={cfg}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "init_from_checkpoint" in proc.stdout
  proc = _export_cli("--workdir", run_dir, "--output_dir", out, "--dtype", "float32")
  assert proc.returncode == 0, proc.stderr[-3000:]
  src, dst = io.CheckpointReader(ref_dir), io.CheckpointReader(out)
  assert sorted(src.keys()) == sorted(dst.keys())
  for name in src.keys():
    assert src.raw_bytes(name) == dst.raw_bytes(name), name
  p = json.loads(open(os.path.join(out, "processor_config.json")).read())
  assert (p["audio_token_id"], p["audio_start_id"], p["audio_end_id"]) == (7, 8, 9)
  # And `train` starts from the run: init_from_checkpoint restores the same weights.
  config = ml_collections.ConfigDict(json.loads(open(os.path.join(run_dir, "config.json")).read()))
  config.train.init_from_checkpoint = os.path.join(run_dir, "checkpoints")
  prog = ts.build_program(config, sharding.make_mesh(config.mesh))
  params = jax.device_get(train.initial_params(config, prog))
  _, want = hf.load_pretrained(ref_dir)
  for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves_with_path(want)):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(pa))


def test_llm_only_export_is_a_plain_qwen3_causal_lm(run, tmp_path):
  workdir, config, params = run
  out = str(tmp_path / "qwen")
  export.export_run(workdir, out, dtype="float32", llm_only=True)
  qwen, info = Qwen3ForCausalLM.from_pretrained(out, output_loading_info=True,
                                                dtype=torch.float32)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids = np.random.default_rng(0).integers(0, config.model.text.vocab_size, (2, 24))
  with torch.no_grad():
    want = qwen.eval()(torch.from_numpy(ids)).logits.numpy()
  model = MossAudioModel(config=config.model)
  pos = np.broadcast_to(np.arange(24, dtype=np.int32), (2, 24))
  got = np.asarray(model.apply({"params": params}, ids.astype(np.int32), pos,
                               np.ones((2, 24), np.int32)))
  diff = float(np.abs(got - want).max())
  print(f"\nllm_only export: max abs logit diff {diff:.2e}")
  assert diff <= TOL


# ----------------------------------------------------------------------------- errors

def test_a_missing_step_lists_the_complete_ones(run, tmp_path):
  workdir, _, _ = run
  with pytest.raises(UserError, match=f"step 7 is not a complete checkpoint .*: 1, {STEPS}$"):
    export.export_run(workdir, str(tmp_path / "out"), step=7)
  with pytest.raises(UserError, match="holds no complete checkpoint"):
    export.export_run(str(tmp_path), str(tmp_path / "out"))


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  (workdir / "checkpoints" / str(STEPS) / "state" / "_METADATA").write_text("{broken")
  with pytest.raises(UserError, match=f"cannot read the checkpoint metadata in .*/{STEPS}/state"):
    export.export_run(str(workdir), str(tmp_path / "out0"), step=STEPS)
  r = export.export_run(str(workdir), str(tmp_path / "out"), dtype="float32")
  assert r.step == 1
  # The shared fallback (as in train and generate) set the broken step aside, not deleted it, so
  # the next reader does not trip over it again and the run's next save replaces it.
  assert [p.name.split(".")[1].split("-")[0] for p in (workdir / "checkpoints").iterdir()
          if p.name.startswith(f"{STEPS}.")] == ["unreadable"]
  assert export.export_run(str(workdir), str(tmp_path / "out2"), dtype="float32").step == 1


def test_a_checkpoint_that_does_not_match_its_config_is_named(run, tmp_path):
  workdir, config, _ = run
  step_dir = os.path.join(workdir, "checkpoints", str(STEPS))
  bad = config.to_dict()
  bad["model"]["text"]["intermediate_size"] = 96
  # The same arrays saved with a config that says another width, as a run changed on resume.
  abstract = ts.build_program(config, sharding.make_mesh(config.mesh)).abstract_state
  state = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=1).restore(
      abstract, step=STEPS).state
  ckpt = checkpoint.Checkpointer(str(tmp_path / "bad" / "checkpoints"), every=1, async_save=False)
  ckpt.save(5, state, {}, bad, force=True)
  ckpt.close()
  with pytest.raises(UserError) as err:
    export.export_run(str(tmp_path / "bad"), str(tmp_path / "out"))
  msg = str(err.value)
  assert "does not match its config.model" in msg and "mlp/up_proj/kernel (2, 32, 64)" in msg
  assert "(config: (2, 32, 96))" in msg and os.path.isdir(step_dir)
  assert not os.path.exists(tmp_path / "out")


def test_an_output_dir_holding_a_model_needs_overwrite(run, tmp_path):
  workdir, _, _ = run
  out = tmp_path / "out"
  export.export_run(workdir, str(out), step=1, dtype="float32")
  first = (out / "model.safetensors").read_bytes()
  with pytest.raises(UserError, match="already holds a model; pass --overwrite"):
    export.export_run(workdir, str(out))
  assert (out / "model.safetensors").read_bytes() == first
  export.export_run(workdir, str(out), overwrite=True)  # step 3, bfloat16, replaces it whole
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_leaves_no_directory_that_looks_complete(run, tmp_path):
  """A file-size limit (as a full disk or quota does) fails the weights write: one error line,
  no OUT, no partial directory left beside it."""
  workdir, _, _ = run
  out = tmp_path / "out"
  proc = subprocess.run(["bash", "-c", 'ulimit -f 100 && exec "$0" "$@"', sys.executable, "-m",
                         "moss_jax.export", "--workdir", workdir, "--output_dir", str(out),
                         "--dtype", "float32"], capture_output=True, text=True, timeout=300,
                        env=train_env("/tmp"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no room to write the export (File too large"), proc.stderr
  assert not out.exists() and not list(tmp_path.iterdir())
  proc = _export_cli("--workdir", workdir, "--output_dir", str(out))
  assert proc.returncode == 0 and "exported step 3" in proc.stdout, proc.stderr[-3000:]
  proc = _export_cli("--output_dir", str(out))
  assert proc.returncode == 2 and "exactly one of --workdir" in proc.stderr


# ----------------------------------------------------------------------------- real processes

_SAVE_2_PROCESSES = """
import sys
sys.path.insert(0, {tests!r})
import jax
from moss_jax import checkpoint, distributed, sharding
from moss_jax import train_step as ts
from moss_jax.train import write_config
from test_train_helpers import run_config

distributed.initialize()
config = run_config()
prog = ts.build_program(config, sharding.make_mesh(config.mesh))
state = prog.init_state(jax.random.key(7))
if jax.process_index() == 0:
  write_config(config, {workdir!r})
ckpt = checkpoint.Checkpointer({ckpt!r}, every=1, async_save=False)
ckpt.save(1, state, {{}}, config.to_dict(), force=True)
ckpt.close()
"""


@pytest.mark.slow
def test_a_checkpoint_saved_by_two_processes_exports_on_another_mesh(tmp_path):
  """2 processes x 4 devices save; this process (8 devices, no distributed run) exports."""
  workdir = tmp_path / "run"
  script = tmp_path / "save.py"
  script.write_text(_SAVE_2_PROCESSES.format(tests=os.path.dirname(__file__), workdir=str(workdir),
                                             ckpt=str(workdir / "checkpoints")))
  env = train_env(str(tmp_path / "cache"), devices=4, LOG_DIR=str(tmp_path / "logs"))
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "2", "4", sys.executable,
                         str(script)], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  state_dir = workdir / "checkpoints" / "1" / "state"
  assert (state_dir / "ocdbt.process_1").is_dir()  # both processes wrote their shards
  out = tmp_path / "out"
  export.export_run(str(workdir), str(out), dtype="float32")
  config = run_config({"mesh.shape": [2, 2, 2]})
  abstract = ts.abstract_params_with_shardings(config.model, sharding.make_mesh(config.mesh))
  want = jax.device_get(checkpoint.restore_params(str(workdir / "checkpoints"), abstract))
  _, got = hf.load_pretrained(str(out))
  for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(want),
                              jax.tree_util.tree_leaves_with_path(got)):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(pa))


@pytest.mark.slow
def test_train_export_at_end_writes_workdir_hf(tmp_path):
  cfg = write_run_config(tmp_path, train__steps=2, train__checkpoint_every=0,
                         train__export_at_end=True)
  workdir = tmp_path / "run"
  proc = subprocess.run(train_command(cfg, str(workdir)), env=train_env(str(tmp_path / "cache")),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported step 2 to {workdir / 'hf'}" in proc.stdout
  model, params = hf.load_pretrained(str(workdir / "hf"))
  assert json.loads((workdir / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
  assert model.config.text.vocab_size == 512 and (workdir / "hf" / "tokenizer.model").exists()


# ----------------------------------------------------------------------------- save_pretrained

@pytest.fixture(scope="module")
def tiny_model():
  config = tiny_config().model
  return MossAudioModel(config=config), jax.device_get(init_params(config, jax.random.key(0)))


def test_save_pretrained_keeps_given_ids_over_a_source_dirs_configs(tiny_model, tmp_path):
  model, params = tiny_model
  src = tmp_path / "released"
  src.mkdir()
  (src / "processor_config.json").write_text(json.dumps(dict(
      processor_class="MossAudioProcessor", audio_token_id=151654, enable_time_marker=True,
      chat_extra="kept", auto_map={"AutoProcessor": "processing_moss_audio.MossAudioProcessor"})))
  (src / "generation_config.json").write_text(json.dumps(dict(bos_token_id=1, do_sample=True)))
  (src / "tokenizer.json").write_text("{}")
  out = tmp_path / "out"
  hf.save_pretrained(str(out), model, params, token_ids=dict(audio_token_id=11, bos_token_id=3),
                     source_dir=str(src), enable_time_marker=False)
  proc = json.loads((out / "processor_config.json").read_text())
  assert proc["audio_token_id"] == 11 and proc["enable_time_marker"] is False
  assert proc["chat_extra"] == "kept"  # the released file is the base
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen["bos_token_id"] == 3 and gen["do_sample"] is True
  assert (out / "tokenizer.json").exists()
  # The remote-code files are not in the directory, so nothing may point at them.
  assert "auto_map" not in proc
  assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_save_pretrained_names_remote_code_only_when_present(tiny_model, tmp_path):
  model, params = tiny_model
  src = tmp_path / "released"
  src.mkdir()
  (src / "configuration_moss_audio.py").write_text("# remote code\n")
  out = tmp_path / "out"
  hf.save_pretrained(str(out), model, params, source_dir=str(src),
                     tokenizer=os.path.join(REPO, "data_pipelines", "sample_corpus",
                                            "tokenizer.model"))
  config = json.loads((out / "config.json").read_text())
  assert config["auto_map"] == {"AutoConfig": "configuration_moss_audio.MossAudioConfig"}
  assert "auto_map" not in json.loads((out / "processor_config.json").read_text())
  assert (out / "tokenizer.model").exists()  # the run's own tokenizer, not only a released one


# ----------------------------------------------------------------------------- buckets

def test_a_run_in_a_bucket_exports_and_exports_into_a_bucket(run, gcs, tmp_path):
  """gs:// both ways against the GCS emulator of tests/test_gcs.py: the same bytes as locally."""
  workdir, _, _ = run
  local = tmp_path / "local"
  export.export_run(workdir, str(local), dtype="float32", max_shard_size="100KB")
  want = {p.name: p.read_bytes() for p in local.iterdir()}
  bucket_run = f"gs://{BUCKET}/export_test/run"
  paths.copy_tree(workdir, bucket_run)
  from_bucket = tmp_path / "from_bucket"
  export.export_run(bucket_run, str(from_bucket), dtype="float32", max_shard_size="100KB")
  assert {p.name: p.read_bytes() for p in from_bucket.iterdir()} == want
  target = f"gs://{BUCKET}/export_test/hf"
  export.export_run(workdir, target, dtype="float32", max_shard_size="100KB")
  _drop_listing_cache()
  assert {p.name: p.read_bytes() for p in epath.Path(target).iterdir()} == want
  with pytest.raises(UserError, match="already holds a model"):
    export.export_run(workdir, target)
