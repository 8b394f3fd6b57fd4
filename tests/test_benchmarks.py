"""The benchmark tooling: `python -m benchmarks.run` discovery and output parsing, and that the
moss_jax vs PyTorch benchmark compares the same model (equal parameter counts)."""

from __future__ import annotations

import pytest

from benchmarks import run, train_step_vs_torch as vs_torch
from moss_jax.model import abstract_params, count_params


def test_run_discovers_benchmarks_and_their_quick_flag():
  found = run.discover()
  assert found["train_step_vs_torch"] is True and found["train_step"] is True
  assert found["conv_stem"] is True and found["step_variants"] is True and found["step_profile"]
  assert "run" not in found and "common" not in found


def test_run_reads_one_line_and_indented_json_and_passes_other_text_on():
  values, other = run.json_values('starting\n{"figure": "a", "value": 1}\n{\n  "b": [1,\n 2]\n}\n'
                                  "done {not json\n")
  assert values == [{"figure": "a", "value": 1}, {"b": [1, 2]}]
  assert other == ["starting", "done {not json"]


def test_variants_and_overrides():
  variants = vs_torch.parse_variants(
      "jax;rolled:model.scan_unroll=1,model.audio.conv_stem_impl=conv")
  assert variants == {"jax": {}, "rolled": {"model.scan_unroll": "1",
                                            "model.audio.conv_stem_impl": "conv"}}
  config = vs_torch.model_config("mid", variants["rolled"])
  assert config.model.scan_unroll == 1 and config.model.audio.conv_stem_impl == "conv"
  with pytest.raises(ValueError, match="no variant"):
    vs_torch.parse_variants(" ; ")
  with pytest.raises(ValueError, match="no field 'attentoin'"):  # a typo is not a new field
    vs_torch.model_config("mid", {"model.attentoin": "xla"})
  from moss_jax.config_validation import ConfigError
  with pytest.raises(ConfigError, match="conv_stem_impl='patches'"):
    vs_torch.checked_model_config("demo", {"model.audio.conv_stem_impl": "patches"})


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


def test_step_profile_areas_follow_scopes_and_module_paths():
  from benchmarks import step_profile as sp
  assert sp.area_of("jit(train_step)/transpose(jvp(loss))/while/body/dot_general") == "loss"
  assert sp.area_of("jit(train_step)/cond/branch_1_fun/optimizer/mul") == "optimizer"
  stem = ("jvp(MossAudioModel.hidden_states)/MossAudioModel.encode_audio/audio_encoder/"
          "audio_encoder.stem/mul")
  assert sp.area_of(stem) == "conv_stem"
  assert sp.area_of("jvp(x)/audio_encoder/layers/self_attn/q_proj/dot_general") == "encoder_layers"
  assert sp.area_of("jvp(x)/language_model/closed_call/layers/self_attn/exp") == "llm_attention"
  assert sp.area_of("jvp(x)/MossAudioModel.embed_with_audio/jit(take_along_axis)") == "llm_other"
  merger = "jvp(MossAudioModel.hidden_states)/deepstack_audio_merger_list_2/up_proj/dot"
  assert sp.area_of(merger) == "deepstack"
  assert sp.area_of("jit(train_step)/lossy_name/add") == "other"
  assert sp.area_of("") == "other"


def test_step_profile_reads_a_real_trace(tmp_path):
  """A jitted function with an `optimizer` scope, profiled for real: its ops are found in the
  trace by instruction name, with time, in the optimizer area; an instruction XLA left without
  metadata takes its operand's op_name."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import step_profile as sp

  def f(x, w):
    with jax.named_scope("optimizer"):
      return jnp.sum(jnp.tanh(x @ w) * 2.0)

  x, w = np.ones((256, 256), np.float32), np.full((256, 256), 0.01, np.float32)
  compiled = jax.jit(f).lower(x, w).compile()
  info = sp.instructions(compiled.as_text())
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      jax.block_until_ready(compiled(x, w))
  totals = sp.op_times(str(tmp_path), info)
  assert totals and all(ns > 0 for ns in totals.values())
  assert {sp.area_of(info[name][1]) for name in totals} == {"optimizer"}

  hlo = ("ENTRY %main (p: f32[4]) -> f32[4] {\n"
         '  %a = f32[4]{0} add(%p, %p), metadata={op_name="jit(f)/optimizer/add"}\n'
         "  ROOT %copy.1 = f32[4]{0} copy(%a)\n}\n")
  assert sp.instructions(hlo)["copy.1"] == ("f32[4]{0}", "jit(f)/optimizer/add")


def test_a_benchmark_interrupted_exits_130_with_one_line():
  """Ctrl-C in a benchmark (`common.run_main`): `interrupted`, exit 130, no traceback."""
  import subprocess
  import sys
  code = ("from benchmarks import common\n"
          "def main():\n"
          "  raise KeyboardInterrupt\n"
          "common.run_main(main)\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=vs_torch.common.REPO, timeout=120, check=False)
  assert done.returncode == 130
  assert done.stderr.strip() == "interrupted"


@pytest.mark.parametrize("module", ["conv_stem", "train_step_vs_torch"])
def test_an_unknown_shape_stops_before_any_shape_runs(module, capsys, monkeypatch):
  """`--shapes mid,big`: an argparse error naming 'big' before mid's minutes of work."""
  import importlib
  bench = importlib.import_module(f"benchmarks.{module}")
  ran = []
  monkeypatch.setattr(bench, "stem_grad_fn" if module == "conv_stem" else "compare",
                      lambda *a, **k: ran.append(a) or [])
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--shapes", "mid,big"])
  assert exit_info.value.code == 2 and not ran
  assert "unknown shape(s) ['big']" in capsys.readouterr().err


@pytest.mark.parametrize("variants,message", [
    ("jax;b:model.attentoin=xla", "no field 'attentoin'"),
    ("jax;b:model.scan_unroll", "an override is KEY=VALUE"),
    ("jax;b:model.scan_unroll=abc", "not a Python literal like the field's int"),
    ("a;b:model.audio.conv_stem_impl=patches", "conv_stem_impl='patches'"),
    (" ; ", "names no variant")])
def test_bad_variants_are_one_usage_error_before_anything_runs(variants, message, capsys):
  """train_step_vs_torch, step_variants and step_profile check every config up front."""
  import argparse
  parser = argparse.ArgumentParser(prog="bench")
  with pytest.raises(SystemExit) as exit_info:
    vs_torch.checked_configs(parser, ["demo", "mid"], variants)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  parsed, configs = vs_torch.checked_configs(parser, ["demo"], "a;b:model.scan_unroll=2")
  assert parsed == {"a": {}, "b": {"model.scan_unroll": "2"}}
  assert configs["demo", "b"].model.scan_unroll == 2 and set(configs) == {("demo", "a"),
                                                                         ("demo", "b")}
