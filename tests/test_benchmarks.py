"""The benchmark tooling: `python -m benchmarks.run` discovery and output parsing, and that the
moss_jax vs PyTorch benchmark compares the same model (equal parameter counts)."""

from __future__ import annotations

import pytest

from benchmarks import run, train_step_vs_torch as vs_torch
from moss_jax.model import abstract_params, count_params


def test_run_discovers_benchmarks_and_their_quick_flag():
  found = run.discover()
  assert found["train_step_vs_torch"] is True and found["train_step"] is True
  assert found["conv_stem"] is True
  assert "run" not in found and "common" not in found


def test_run_reads_one_line_and_indented_json_and_passes_other_text_on():
  values, other = run.json_values('starting\n{"figure": "a", "value": 1}\n{\n  "b": [1,\n 2]\n}\n'
                                  "done {not json\n")
  assert values == [{"figure": "a", "value": 1}, {"b": [1, 2]}]
  assert other == ["starting", "done {not json"]


def test_variants_and_overrides():
  variants = vs_torch.parse_variants("jax;rolled:model.scan_unroll=1,model.audio.conv_stem_impl=conv")
  assert variants == {"jax": {}, "rolled": {"model.scan_unroll": "1",
                                            "model.audio.conv_stem_impl": "conv"}}
  config = vs_torch.model_config("mid", variants["rolled"])
  assert config.model.scan_unroll == 1 and config.model.audio.conv_stem_impl == "conv"
  with pytest.raises(ValueError, match="no variant"):
    vs_torch.parse_variants(" ; ")


@pytest.mark.parametrize("shape,params", [("mid", 36_281_600), ("demo", None)])
def test_both_frameworks_build_the_same_model(shape, params, monkeypatch):
  """Same parameter count in the JAX model and the tests' PyTorch reference (the issue's 36.3 M
  for the mid shape)."""
  pytest.importorskip("torch")
  monkeypatch.syspath_prepend(str(vs_torch.common.REPO) + "/tests")
  import torch_reference as tr  # pylint: disable=import-outside-toplevel
  config = vs_torch.model_config(shape)
  n_jax = count_params(abstract_params(config.model))
  ref = tr.TorchMossAudio(vs_torch.torch_reference_config(config))
  assert sum(p.numel() for p in ref.parameters()) == n_jax
  if params:
    assert n_jax == params
