"""moss_jax/metrics.py's writers: what a run leaves in its workdir, and what they cost to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_fresh_interpreter(code: str, tmp_path) -> dict:
  """Runs `code` in a new Python (nothing imported yet) and returns the JSON it prints last."""
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_metric_writer_writes_tensorboard_and_jsonl_without_importing_torch(tmp_path):
  pytest.importorskip("torch")  # the point: torch is installed, and a run still does not load it
  out = _in_fresh_interpreter(f"""
      import json, struct, sys
      from moss_jax import metrics
      w = metrics.MetricWriter({str(tmp_path / 'run')!r}, stream=sys.stderr)
      w.write(7, "train", {{"loss": 1.5, "mfu": 0.25}})
      w.close()
      torch_after_writer = "torch" in sys.modules
      from tensorboardX.proto import event_pb2
      import glob
      (path,) = glob.glob({str(tmp_path / 'run' / 'tensorboard' / 'events.out.tfevents.*')!r})
      data, pos, scalars = open(path, "rb").read(), 0, {{}}
      while pos < len(data):  # TFRecord: length, crc, payload, crc
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        for v in ev.summary.value:
          scalars[v.tag] = (ev.step, v.simple_value)
        pos += 12 + n + 4
      import torch  # still importable after the writer blocked it during tensorboardX's import
      print(json.dumps(dict(torch_after_writer=torch_after_writer, scalars=scalars,
                            torch_ok=bool(torch.zeros(2).shape == (2,)),
                            jsonl=open({str(tmp_path / 'run' / 'metrics.jsonl')!r}).read())))
      """, tmp_path)
  assert out["torch_after_writer"] is False
  assert out["scalars"] == {"train/loss": [7, 1.5], "train/mfu": [7, 0.25]}
  assert out["torch_ok"]
  row = json.loads(out["jsonl"].splitlines()[-1])
  assert (row["step"], row["split"], row["loss"], row["mfu"]) == (7, "train", 1.5, 0.25)


def test_metric_writer_after_torch_was_imported_keeps_torch(tmp_path):
  pytest.importorskip("torch")
  out = _in_fresh_interpreter(f"""
      import json, sys
      import torch
      from moss_jax import metrics
      w = metrics.MetricWriter({str(tmp_path / 'run')!r}, stream=sys.stderr)
      w.write(1, "train", {{"loss": 2.0}})
      w.close()
      print(json.dumps(dict(same=sys.modules["torch"] is torch)))
      """, tmp_path)
  assert out["same"]
