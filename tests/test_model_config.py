"""The schema of config.model (moss_jax/model_config.py): one home for every field and default."""

from __future__ import annotations

import pytest

from configs import base
from moss_jax import model_config as mc
from moss_jax.hf import config_io


def test_shape_fields_are_required_and_unknown_fields_rejected():
  tiny = mc.SIZES["tiny"]
  audio = {k: v for k, v in tiny["audio"].items() if k != "d_model"}
  with pytest.raises(ValueError, match=r"missing shape field\(s\) \['audio.d_model', "
                     r"'adapter_hidden_size'\]"):
    mc.model_config(audio=audio, text=tiny["text"])
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['text.chunk_frames'\]"):
    mc.model_config(audio=tiny["audio"], text=dict(tiny["text"], chunk_frames=400),
                    adapter_hidden_size=8)


@pytest.mark.parametrize("size", ["tiny", "4b", "8b"])
def test_reference_config_json_round_trips_through_the_schema(size):
  """A config read from config.json has every field the recipes' configs have, with the
  schema's defaults for the fields config.json does not carry."""
  ours = base.model_config(size)
  back = config_io.model_config_from_hf(config_io.hf_config_from_model(ours))
  back.dtype, back.param_dtype = ours.dtype, ours.param_dtype
  assert back.to_dict() == ours.to_dict()


def test_other_chunk_lengths_are_refused():
  hf = config_io.hf_config_from_model(base.model_config("tiny"))
  hf["audio_config"]["n_window"] = 100
  with pytest.raises(ValueError, match="n_window 100"):
    config_io.model_config_from_hf(hf)
  hf["audio_config"]["n_window"] = 200  # the reference code default: accepted
  config_io.model_config_from_hf(hf)


def test_merger_count():
  assert mc.num_mergers(mc.sized("4b")) == 3
  assert mc.num_mergers(mc.sized("tiny")) == 2  # two encoder taps
  assert mc.num_mergers(mc.sized("tiny", deepstack_num_inject_layers=1)) == 1
