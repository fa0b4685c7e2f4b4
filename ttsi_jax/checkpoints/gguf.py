"""GGUF files (llama.cpp) -> ModelConfig + dequantized params, through the same HF name table.

GGUF tensor names are renamed to HF names and handed to `hf.params_from_hf`, so the param layout
logic lives in one place. llama.cpp stores Llama q/k weights permuted for its interleaved RoPE;
we undo that permutation to get the HF "rotate half" layout.
"""

from __future__ import annotations

import os
import re

import gguf
import numpy as np

from ttsi_jax.checkpoints import hf
from ttsi_jax.checkpoints.hf import CheckpointError
from ttsi_jax.model.transformer import ModelConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str | None:
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
  return None


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation (interleaved pairs -> rotate-half halves)."""
  out_dim = w.shape[0]
  return w.reshape(num_heads, out_dim // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_reader(path: str) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise CheckpointError(
        f'GGUF file {path} does not exist; check --config.model.path ("" ' "loads the embedded default)."
    )
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises a mix of ValueError/struct/numpy errors on bad files
    raise CheckpointError(
        f"{path}: not a readable GGUF file ({type(e).__name__}: {e}). The file is "
        "corrupt or truncated; download it again."
    ) from None


def _field(reader: gguf.GGUFReader, key: str, path: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise CheckpointError(f"{path}: metadata key {key!r} is missing.")
  return field.contents()


def config_from_gguf(reader: gguf.GGUFReader, path: str, dtype: str = "float32") -> ModelConfig:
  arch = _field(reader, "general.architecture", path)
  if arch not in _ARCHITECTURES:
    raise CheckpointError(
        f"{path}: GGUF architecture {arch!r} is not supported; supported are " f"{sorted(_ARCHITECTURES)}."
    )
  names = {t.name for t in reader.tensors}
  unknown = sorted(n for n in names if hf_name(n) is None)
  if unknown:  # e.g. rope_freqs.weight: Llama-3.1 RoPE scaling, which would load silently wrong
    raise CheckpointError(
        f"{path}: tensors {unknown[:5]} are not supported (this loader reads "
        "Llama / Qwen2 / Qwen3 GGUFs without RoPE scaling); load the model's HF "
        "checkpoint folder instead."
    )
  scaling = reader.fields.get(f"{arch}.rope.scaling.type")
  scaling = bytes(scaling.parts[-1]).decode() if scaling is not None else ""
  # llama.cpp scales linearly by a factor given without a type, or under the older key.
  factor = reader.fields.get(f"{arch}.rope.scaling.factor") or reader.fields.get(f"{arch}.rope.scale_linear")
  factor = float(factor.contents()) if factor is not None else 0.0
  if scaling not in ("", "none", "linear") or factor not in (0.0, 1.0):
    raise CheckpointError(
        f"{path}: RoPE scaling (type {scaling or 'unset'!r}, factor {factor or 'unset'}) in GGUF "
        "metadata is not supported; load the model's HF checkpoint folder instead."
    )
  num_heads = int(_field(reader, f"{arch}.attention.head_count", path))
  embed_dim = int(_field(reader, f"{arch}.embedding_length", path))
  vocab = reader.fields.get(f"{arch}.vocab_size")
  vocab_size = int(vocab.contents()) if vocab else len(_field(reader, "tokenizer.ggml.tokens", path))
  cfg = {
      "architectures": [_ARCHITECTURES[arch]],
      "vocab_size": vocab_size,
      "hidden_size": embed_dim,
      "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length", path)),
      "num_hidden_layers": int(_field(reader, f"{arch}.block_count", path)),
      "num_attention_heads": num_heads,
      "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", path, num_heads)),
      "head_dim": int(_field(reader, f"{arch}.attention.key_length", path, embed_dim // num_heads)),
      "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
      "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
      "max_position_embeddings": int(_field(reader, f"{arch}.context_length", path, 4096)),
      "tie_word_embeddings": "output.weight" not in names,
  }
  return hf.config_from_hf(cfg, where=path, dtype=dtype)


def load(path: str, dtype: str = "float32", place=None) -> tuple[ModelConfig, dict]:
  """(config, params) from a GGUF file, every tensor dequantized to float32 on the host."""
  reader = open_reader(path)
  config = config_from_gguf(reader, path, dtype)
  tensors = {hf_name(t.name): t for t in reader.tensors if hf_name(t.name)}
  permute = config.architecture == "LlamaForCausalLM"
  read = set()

  def get_tensor(name: str) -> np.ndarray:
    if name not in tensors:
      raise CheckpointError(f"{path}: tensor for {name} is missing from the GGUF file.")
    read.add(name)
    t = tensors[name]
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise CheckpointError(
          f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): " f"{e}"
      ) from None
    x = np.asarray(x, np.float32)
    if permute and name.endswith("self_attn.q_proj.weight"):
      x = _unpermute(x, config.num_heads)
    elif permute and name.endswith("self_attn.k_proj.weight"):
      x = _unpermute(x, config.num_kv_heads)
    return x

  params = hf.params_from_hf(config, get_tensor, place)
  unread = sorted(tensors[name].name for name in set(tensors) - read)
  if unread:  # e.g. q/k/v biases of a llama GGUF: its metadata cannot say the model has them
    raise CheckpointError(
        f"{path}: tensors {unread[:5]} are not part of the {config.architecture} this GGUF's "
        "metadata describes; load the model's HF checkpoint folder instead."
    )
  return config, params
