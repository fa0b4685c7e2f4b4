"""GGUF: the embedded SmolLM2 default against transformers loading the same file, and bad files."""

import os

import gguf
import numpy as np
import pytest
import torch
import transformers

from ttsi_jax import checkpoints
from ttsi_jax.checkpoints.hf import CheckpointError
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import tokenizer as tokenizer_lib

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a function call is in one sentence.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def embedded():
  config, params = checkpoints.load(None)
  return config, params, tokenizer_lib.load(None)


def test_embedded_default_resolves_without_a_path(embedded):
  config, _, tokenizer = embedded
  assert checkpoints.embedded_default_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert (config.architecture, config.num_layers, config.embed_dim) == ("LlamaForCausalLM", 30, 576)
  assert config.tie_embeddings and tokenizer.stop_ids == (tokenizer.hf.eos_token_id,)


def test_embedded_greedy_tokens_equal_transformers(embedded):
  config, params, tokenizer = embedded
  prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
  ours = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id).generate(
      prompts, sampler_lib.SamplingParams(max_new_tokens=32)
  )
  path = checkpoints.embedded_default_path()
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = ref_model.generate(
          torch.tensor([prompt]),
          max_new_tokens=32,
          do_sample=False,
          attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      )
    ref = ref[0, len(prompt) :].tolist()
    if ref and ref[-1] in tokenizer.stop_ids:
      ref = ref[:-1]  # we return the completion without its stop token
    assert got == ref
  assert any(len(o) == 32 for o in ours) and any(len(o) < 32 for o in ours)


def test_truncated_gguf_names_file_and_problem(tmp_path):
  data = open(checkpoints.embedded_default_path(), "rb").read()
  bad = tmp_path / "model.gguf"
  bad.write_bytes(data[: len(data) // 3])
  with pytest.raises(CheckpointError, match=r"model.gguf.*(corrupt or truncated)"):
    checkpoints.load(str(bad))


def test_corrupt_gguf_names_file_and_problem(tmp_path):
  bad = tmp_path / "garbage.gguf"
  bad.write_bytes(np.random.RandomState(0).bytes(4096))
  with pytest.raises(CheckpointError, match=r"garbage.gguf.*not a readable GGUF"):
    checkpoints.load(str(bad))


def test_missing_gguf_is_named(tmp_path):
  with pytest.raises(CheckpointError, match=r"nope.gguf does not exist"):
    checkpoints.load(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"tensor": "rope_freqs.weight"}, r"\['rope_freqs.weight'\] are not supported"),
        ({"scaling": "yarn"}, r"RoPE scaling \(type 'yarn', factor unset\)"),
        # llama.cpp scales linearly by a factor without a type, or under the older key
        ({"factor": ("llama.rope.scaling.factor", 4.0)}, r"RoPE scaling \(type 'unset', factor 4.0\)"),
        ({"factor": ("llama.rope.scale_linear", 2.0)}, r"RoPE scaling \(type 'unset', factor 2.0\)"),
        ({"scaling": "linear", "factor": ("llama.rope.scaling.factor", 8.0)}, r"type 'linear', factor 8.0"),
    ],
)
def test_gguf_features_we_cannot_run_exactly_are_refused(tmp_path, extra, message):
  path = str(tmp_path / "model.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(1)
  if "scaling" in extra:
    writer.add_string("llama.rope.scaling.type", extra["scaling"])
  if "factor" in extra:
    writer.add_float32(*extra["factor"])
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  if "tensor" in extra:
    writer.add_tensor(extra["tensor"], np.ones((2,), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(CheckpointError, match=message):
    checkpoints.load(path)


def _write_llama_gguf(path, extra_tensors=(), metadata=None):
  """A complete one-layer llama GGUF (width 8, 2 heads, MLP 16, 8 tokens), plus `extra_tensors`
  and float `metadata`."""
  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(path, "llama")
  for key, value in (metadata or {}).items():
    writer.add_float32(key, value)
  writer.add_block_count(1)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_head_count_kv(2)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_context_length(64)
  writer.add_token_list([f"t{i}" for i in range(8)])
  shapes = {"token_embd.weight": (8, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,)}
  shapes |= {f"blk.0.{n}.weight": (8, 8) for n in ("attn_q", "attn_k", "attn_v", "attn_output")}
  shapes |= {"blk.0.ffn_norm.weight": (8,), "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8)}
  shapes |= {"blk.0.ffn_down.weight": (8, 16), **dict(extra_tensors)}
  for name, shape in shapes.items():
    writer.add_tensor(name, rng.normal(size=shape).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_without_rope_scaling_or_a_factor_of_one_loads_and_any_case_of_extension_is_gguf(tmp_path):
  path = str(tmp_path / "model.GGUF")
  _write_llama_gguf(path, metadata={"llama.rope.scaling.factor": 1.0})
  config, _ = checkpoints.load(path)
  assert config.rope_scaling is None and config.num_layers == 1


def test_gguf_tensors_its_metadata_cannot_place_are_refused(tmp_path):
  """Llama's metadata has no attention-bias key: q/k/v biases would be dropped, not run."""
  plain, biased = str(tmp_path / "plain.gguf"), str(tmp_path / "biased.gguf")
  _write_llama_gguf(plain)
  config, _ = checkpoints.load(plain)
  assert (config.num_layers, config.embed_dim, config.qkv_bias) == (1, 8, False)
  _write_llama_gguf(biased, {"blk.0.attn_q.bias": (8,)})
  with pytest.raises(CheckpointError, match=r"tensors \['blk.0.attn_q.bias'\] are not part of the Llama"):
    checkpoints.load(biased)
