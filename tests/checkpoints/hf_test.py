"""HF checkpoint folders: the name table in both directions, sharded files, and bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.conftest import ARCHS, make_hf_model
from ttsi_jax import checkpoints
from ttsi_jax.checkpoints import hf
from ttsi_jax.checkpoints.hf import CheckpointError


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_table_round_trips_the_state_dict(hf_checkpoints, arch):
  folder, model = hf_checkpoints[arch]
  config, params = hf.load(folder)
  exported = hf.params_to_hf(config, params)
  expected = {k: v.numpy() for k, v in model.state_dict().items()}
  if config.tie_embeddings:
    expected.pop("lm_head.weight")
  assert sorted(exported) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  assert hf.config_from_hf(hf.config_to_hf(config)) == config


def test_config_shapes_come_from_the_checkpoint(hf_checkpoints):
  config = hf.read_config(hf_checkpoints["qwen3"][0])
  assert (config.head_dim, config.num_kv_heads, config.qk_norm) == (24, 2, True)
  llama = hf.read_config(hf_checkpoints["llama"][0])
  assert llama.rope_scaling is not None and llama.rope_scaling.factor == 8.0
  assert llama.rope_theta == 50000.0


def test_sharded_safetensors_index_loads(tmp_path, hf_checkpoints):
  model = make_hf_model("llama")
  model.save_pretrained(tmp_path, max_shard_size="100KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  _, sharded = hf.load(str(tmp_path))
  _, single = hf.load(hf_checkpoints["llama"][0])
  with open(tmp_path / "model.safetensors.index.json") as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1  # the tensors really are in several files
  assert jax.tree.structure(sharded) == jax.tree.structure(single)
  jax.tree.map(np.testing.assert_array_equal, sharded, single)  # every tensor, from whichever shard


def _copy(folder, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(folder, dst)
  return dst


def test_missing_folder_names_the_folder(tmp_path):
  missing = tmp_path / "no_such_model"
  with pytest.raises(CheckpointError, match=f"{missing}.*does not exist"):
    checkpoints.load(str(missing))


def test_a_sliding_window_bounds_the_context_and_survives_export(tmp_path, hf_checkpoints):
  from ttsi_jax.text import sampler as sampler_lib

  dst = _copy(hf_checkpoints["llama"][0], tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
  (dst / "config.json").write_text(json.dumps(cfg))
  config, params = checkpoints.load(str(dst))
  assert config.context_length == 64 < config.max_position_embeddings
  assert hf.config_to_hf(config)["sliding_window"] == 64
  sampler = sampler_lib.Sampler(config, params, stop_ids=[0], pad_id=0)
  sampler.prefill([[1] * 30], reserve=32)  # 32 + 32: within the window
  with pytest.raises(ValueError, match="context of 64 tokens \\(its sliding window\\)"):
    sampler.prefill([[1] * 30], reserve=64)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, r"config.json.*'GPT2LMHeadModel'.*LlamaForCausalLM"),
        ({"hidden_act": "gelu"}, r"config.json: hidden_act='gelu' is not supported \(only silu\)"),
        ({"mlp_bias": True}, r"mlp_bias=true is not supported"),
        ({"use_sliding_window": True}, r"sliding-window attention is not supported"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, r"rope type 'linear' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn' is not supported"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
            r"rope type 'dynamic' is not supported",
        ),
    ],
)
def test_unsupported_model_config_is_named(tmp_path, hf_checkpoints, change, message):
  dst = _copy(hf_checkpoints["llama"][0], tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg.update(change)
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=message):
    checkpoints.load(str(dst))


def _config(**fields) -> dict:
  """A minimal Llama config.json, with `fields` set (None: left out)."""
  cfg = dict(
      architectures=["LlamaForCausalLM"],
      vocab_size=8,
      num_hidden_layers=1,
      hidden_size=8,
      num_attention_heads=2,
      intermediate_size=16,
      max_position_embeddings=64,
  )
  cfg.update(fields)
  return {k: v for k, v in cfg.items() if v is not None}


def test_fields_a_config_leaves_out_take_transformers_defaults():
  transformers = pytest.importorskip("transformers")
  mistral = _config(architectures=["MistralForCausalLM"], max_position_embeddings=None)
  config = hf.config_from_hf(mistral)
  reference = transformers.MistralConfig(**mistral)
  assert config.sliding_window == reference.sliding_window == 4096
  assert config.max_position_embeddings == reference.max_position_embeddings
  assert hf.config_from_hf({**mistral, "sliding_window": None}).sliding_window is None  # null: none
  llama = _config(max_position_embeddings=None)
  assert (
      hf.config_from_hf(llama).max_position_embeddings == transformers.LlamaConfig().max_position_embeddings
  )
  # llama3 RoPE without original_max_position_embeddings: transformers takes max_position_embeddings.
  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
  assert hf.config_from_hf(_config(rope_scaling=rope)).rope_scaling.original_max_position_embeddings == 64
  with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):  # the older key
    hf.config_from_hf(_config(rope_scaling={"type": "yarn", "factor": 4.0}))
  assert hf.config_from_hf(_config(hidden_act="swish")) == hf.config_from_hf(_config())  # silu's other name
  # Mistral's modules have no biases: transformers ignores attention_bias there, and so do we.
  biased = hf.config_from_hf({**mistral, "attention_bias": True})
  assert (biased.qkv_bias, biased.o_bias) == (False, False)


def test_a_file_given_as_the_checkpoint_folder_and_a_missing_shard_are_named(tmp_path, hf_checkpoints):
  dst = _copy(hf_checkpoints["llama"][0], tmp_path)
  with pytest.raises(CheckpointError, match=r"model.safetensors is a file, not a checkpoint folder"):
    checkpoints.load(str(dst / "model.safetensors"))
  sharded = tmp_path / "sharded"
  make_hf_model("llama").save_pretrained(sharded, max_shard_size="100KB")
  with open(sharded / "model.safetensors.index.json") as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(sharded / shard)
  with pytest.raises(CheckpointError, match=rf"index.json names \['{shard}'\], which is not in"):
    checkpoints.load(str(sharded))


def test_truncated_safetensors_names_file_and_problem(tmp_path, hf_checkpoints):
  dst = _copy(hf_checkpoints["llama"][0], tmp_path)
  path = dst / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated"):
    checkpoints.load(str(dst))


def test_corrupt_safetensors_names_file_and_problem(tmp_path, hf_checkpoints):
  dst = _copy(hf_checkpoints["llama"][0], tmp_path)
  (dst / "model.safetensors").write_bytes(b"\x07" * 64)
  with pytest.raises(CheckpointError, match=r"model.safetensors.*corrupt"):
    checkpoints.load(str(dst))


def test_missing_tensor_is_named(tmp_path, hf_checkpoints):
  from safetensors.numpy import load_file, save_file

  dst = _copy(hf_checkpoints["qwen2"][0], tmp_path)
  tensors = load_file(dst / "model.safetensors")
  tensors.pop("model.layers.1.self_attn.k_proj.bias")
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.k_proj.bias is missing"):
    checkpoints.load(str(dst))


def test_quantized_checkpoints_are_refused_not_read_as_numbers(tmp_path, hf_checkpoints):
  """An int8 checkpoint's weights match the name table: read as floats they would load as ±127."""
  from safetensors.numpy import load_file, save_file

  dst = _copy(hf_checkpoints["llama"][0], tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  (dst / "config.json").write_text(
      json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})
  )
  with pytest.raises(CheckpointError, match=r"quantized checkpoints \('bitsandbytes'\) are not supported"):
    checkpoints.load(str(dst))
  (dst / "config.json").write_text(json.dumps(cfg))  # the config says nothing: the tensors do
  tensors = load_file(dst / "model.safetensors")
  name = "model.layers.0.self_attn.q_proj.weight"
  tensors[name] = np.clip(tensors[name] * 1000, -127, 127).astype(np.int8)
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(CheckpointError, match=rf"{name} holds int8 values, not floats"):
    checkpoints.load(str(dst))


@pytest.mark.parametrize(
    "header, message",
    [
        ({"w": {"dtype": "F32", "shape": [2]}}, r"header is malformed \(KeyError: 'data_offsets'\)"),
        (["w"], r"header is malformed \(TypeError"),
        (
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            r"tensor w's shape \[3\] does not fit",
        ),
    ],
)
def test_a_malformed_safetensors_header_is_named(tmp_path, header, message):
  head = json.dumps(header).encode()
  path = tmp_path / "model.safetensors"
  path.write_bytes(len(head).to_bytes(8, "little") + head + bytes(8))
  with pytest.raises(CheckpointError, match=r"model.safetensors: .*" + message):
    hf.SafetensorsFile(str(path))


def test_a_single_file_is_read_before_a_sharded_index_as_transformers_does(tmp_path, hf_checkpoints):
  dst = _copy(hf_checkpoints["llama"][0], tmp_path)
  (dst / "model.safetensors.index.json").write_text('{"weight_map": {"x": "gone.safetensors"}}')
  _, params = hf.load(str(dst))
  _, original = hf.load(hf_checkpoints["llama"][0])
  jax.tree.map(np.testing.assert_array_equal, params, original)
  (dst / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match=r"names \['gone.safetensors'\], which is not in"):
    hf.load(str(dst))


def test_the_fingerprint_tells_other_weights_at_one_path_and_matches_a_copy(tmp_path, hf_checkpoints):
  folder = hf_checkpoints["llama"][0]
  copy = _copy(folder, tmp_path)
  assert checkpoints.fingerprint(str(copy)) == checkpoints.fingerprint(folder)  # moved elsewhere
  (copy / "README.md").write_text("notes")
  (copy / "pytorch_model.bin").write_bytes(b"torch's copy of the weights")  # not read
  (copy / "trainer_state.json").write_text("{}")
  assert checkpoints.fingerprint(str(copy)) == checkpoints.fingerprint(folder)  # not the model
  weights = bytearray((copy / "model.safetensors").read_bytes())
  weights[-5] ^= 1
  (copy / "model.safetensors").write_bytes(bytes(weights))
  assert checkpoints.fingerprint(str(copy)) != checkpoints.fingerprint(folder)
  (copy / "model.safetensors").write_bytes(open(os.path.join(folder, "model.safetensors"), "rb").read())
  (copy / "chat_template.jinja").write_text("{{ messages }}")  # another chat template
  assert checkpoints.fingerprint(str(copy)) != checkpoints.fingerprint(folder)
  big = tmp_path / "m.gguf"  # a large file: by size, first and last MiB
  big.write_bytes(bytes(3 << 20))
  before = checkpoints.fingerprint(str(big))
  big.write_bytes(bytes(3 << 20)[:-1] + b"\x01")
  assert checkpoints.fingerprint(str(big)) != before
  with pytest.raises(CheckpointError, match="No checkpoint at"):
    checkpoints.fingerprint(str(tmp_path / "nothing"))
