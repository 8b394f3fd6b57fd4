"""Reference parameter counts (spec sections 4 and 6.1) from abstract shapes; nothing allocated."""

import jax
import pytest

from configs import pretrain
from moss_jax import model as M

# (encoder, adapter + mergers, language_model incl. embeddings, lm_head)
REFERENCE = {
    "4b": (643_624_320, 167_772_160, 4_022_468_096, 388_956_160),
    "8b": (643_624_320, 218_103_808, 7_568_405_504, 622_329_856),
}


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_reference_param_counts(size):
  params = M.abstract_params(pretrain.get_config(size).model)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  adapters = {k: v for k, v in params.items()
              if k == "audio_adapter" or k.startswith("deepstack_audio_merger_list_")}
  assert len(adapters) == 4
  got = (M.count_params(params["audio_encoder"]), M.count_params(adapters),
         M.count_params(params["language_model"]), M.count_params(params["lm_head"]))
  assert got == REFERENCE[size]
  assert M.count_params(params) == sum(REFERENCE[size])


def test_4b_tensor_manifest_shapes():
  """The unrolled tree has the reference's 901 tensors; a few shapes in Flax [in, out] layout."""
  params = M.unstack_layers(M.abstract_params(pretrain.get_config("4b").model))
  assert len(jax.tree.leaves(params)) == 901
  enc, lm = params["audio_encoder"], params["language_model"]
  assert enc["conv2"]["kernel"].shape == (3, 3, 480, 480)
  assert enc["stem_proj"]["kernel"].shape == (7680, 1280)
  assert "bias" not in enc["layers_31"]["self_attn"]["k_proj"]
  assert lm["layers_35"]["self_attn"]["q_proj"]["kernel"].shape == (2560, 4096)
  assert lm["layers_0"]["self_attn"]["k_norm"]["scale"].shape == (128,)
  assert params["deepstack_audio_merger_list_2"]["down_proj"]["kernel"].shape == (8192, 2560)
  assert params["lm_head"]["kernel"].shape == (2560, 151936)


def test_abstract_shapes_follow_a_changed_config():
  """The traced init is kept per config content: a config changed in place gets new shapes, and
  the axes and shapes handed out are the same for equal configs."""
  c = pretrain.get_config("demo").model
  before = M.abstract_params(c)
  axes = M.param_logical_axes(c)
  c.text.intermediate_size = 2 * c.text.intermediate_size
  after = M.abstract_params(c)
  mlp = lambda p: p["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].shape
  assert mlp(after)[-1] == 2 * mlp(before)[-1]
  c.text.intermediate_size //= 2
  assert mlp(M.abstract_params(c)) == mlp(before)
  assert M.param_logical_axes(c) == axes
