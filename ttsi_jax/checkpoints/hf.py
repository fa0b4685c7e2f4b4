"""Hugging Face checkpoints: config.json -> ModelConfig, and one name table for import and export.

`PARAM_TABLE` is the single description of how our param tree maps onto HF tensor names; both
`params_from_hf` (import) and `params_to_hf` (export) walk it, so the two directions cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Mapping, Optional

import jax
import ml_dtypes
import numpy as np

from ttsi_jax.model import transformer
from ttsi_jax.model.transformer import ModelConfig, RopeScaling


class CheckpointError(ValueError):
  """A checkpoint file or folder that cannot be used, with what to do about it."""


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


# --------------------------------------------------------------------------------------- config


def _rope(cfg: Mapping, where: str) -> tuple[float, Optional[RopeScaling]]:
  # transformers >= 5 nests rope settings in "rope_parameters"; older configs keep them top level.
  params = dict(cfg.get("rope_parameters") or {})
  scaling = dict(cfg.get("rope_scaling") or {})
  theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  spec = {**scaling, **params}
  if rope_type == "default":
    return float(theta), None
  if rope_type == "llama3":
    return float(theta), RopeScaling(
        factor=float(spec["factor"]),
        low_freq_factor=float(spec["low_freq_factor"]),
        high_freq_factor=float(spec["high_freq_factor"]),
        # transformers' default where the config leaves it out
        original_max_position_embeddings=int(
            spec.get("original_max_position_embeddings")
            or cfg.get("max_position_embeddings", _DEFAULTS["LlamaForCausalLM"]["max_position_embeddings"])
        ),
    )
  raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (supported: default, " "llama3).")


# transformers' class defaults for the fields a config.json may leave out (LlamaConfig,
# MistralConfig, Qwen2Config, Qwen3Config): a model without the key runs as transformers runs it.
_DEFAULTS = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "sliding_window": None},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "sliding_window": None},
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "sliding_window": None},
}


def config_from_hf(cfg: Mapping, where: str = "config.json", dtype: str = "float32") -> ModelConfig:
  """ModelConfig from a HF config dict; `where` names the file in error messages."""
  archs = cfg.get("architectures") or []
  arch = archs[0] if archs else None
  quantization = cfg.get("quantization_config")
  if quantization:  # its integer weights and scales would load as plain numbers
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else quantization
    raise CheckpointError(
        f"{where}: quantized checkpoints ({method!r}) are not supported; load the unquantized "
        "weights (or a GGUF file, whose quantizations are dequantized on load)."
    )
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(
        f"{where}: architecture {arch!r} is not supported; supported "
        f"architectures are {list(SUPPORTED_ARCHITECTURES)}."
    )
  try:
    num_heads = int(cfg["num_attention_heads"])
    embed_dim = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg, where)
    if cfg.get("mlp_bias"):
      raise CheckpointError(f"{where}: mlp_bias=true is not supported.")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):  # one function, two names
      raise CheckpointError(f"{where}: hidden_act={cfg['hidden_act']!r} is not supported (only " "silu).")
    if cfg.get("use_sliding_window"):
      raise CheckpointError(f"{where}: sliding-window attention is not supported.")
    is_qwen2 = arch == "Qwen2ForCausalLM"
    # Mistral's modules have no biases whatever the key says (transformers ignores it there).
    attention_bias = bool(cfg.get("attention_bias", False)) and arch != "MistralForCausalLM"
    defaults = _DEFAULTS[arch]
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or embed_dim // num_heads),
        mlp_dim=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", defaults["max_position_embeddings"])),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias and not is_qwen2,
        qk_norm=arch == "Qwen3ForCausalLM",
        param_dtype=dtype,
        dtype=dtype,
        sliding_window=(
            int(cfg.get("sliding_window", defaults["sliding_window"]) or 0) or None
            if arch == "MistralForCausalLM"
            else None
        ),
    )
  except KeyError as e:
    raise CheckpointError(f"{where}: required field {e.args[0]!r} is missing.") from None


def config_to_hf(config: ModelConfig) -> dict:
  """The config.json that transformers needs to rebuild this model (export direction)."""
  model_type = {
      "LlamaForCausalLM": "llama",
      "MistralForCausalLM": "mistral",
      "Qwen2ForCausalLM": "qwen2",
      "Qwen3ForCausalLM": "qwen3",
  }[config.architecture]
  cfg = {
      "architectures": [config.architecture],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.embed_dim,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_embeddings,
      "hidden_act": "silu",
      "torch_dtype": "float32",
      "rope_theta": config.rope_theta,
  }
  if config.architecture != "Qwen2ForCausalLM":  # Qwen2's q/k/v biases are implied by its type
    cfg["attention_bias"] = config.o_bias
  if config.architecture == "MistralForCausalLM":
    cfg["sliding_window"] = config.sliding_window
  if config.rope_scaling is not None:
    cfg["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
  return cfg


# ----------------------------------------------------------------------------------- name table


@dataclasses.dataclass(frozen=True)
class Entry:
  """One param: our path, the HF name ({i} = layer), whether it is a transposed Linear weight."""

  path: tuple[str, ...]
  hf_name: str
  linear: bool = False
  when: Callable[[ModelConfig], bool] = lambda c: True

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name


def _layer(path: str, hf: str, linear=False, when=lambda c: True) -> Entry:
  return Entry(("layers",) + tuple(path.split("/")), "model.layers.{i}." + hf, linear, when)


_qkv_bias = lambda c: c.qkv_bias
PARAM_TABLE: tuple[Entry, ...] = (
    Entry(("embedding",), "model.embed_tokens.weight"),
    Entry(("norm", "scale"), "model.norm.weight"),
    Entry(("lm_head", "kernel"), "lm_head.weight", linear=True, when=lambda c: not c.tie_embeddings),
    _layer("input_norm/scale", "input_layernorm.weight"),
    _layer("post_attn_norm/scale", "post_attention_layernorm.weight"),
    _layer("attn/q_proj/kernel", "self_attn.q_proj.weight", linear=True),
    _layer("attn/k_proj/kernel", "self_attn.k_proj.weight", linear=True),
    _layer("attn/v_proj/kernel", "self_attn.v_proj.weight", linear=True),
    _layer("attn/o_proj/kernel", "self_attn.o_proj.weight", linear=True),
    _layer("attn/q_proj/bias", "self_attn.q_proj.bias", when=_qkv_bias),
    _layer("attn/k_proj/bias", "self_attn.k_proj.bias", when=_qkv_bias),
    _layer("attn/v_proj/bias", "self_attn.v_proj.bias", when=_qkv_bias),
    _layer("attn/o_proj/bias", "self_attn.o_proj.bias", when=lambda c: c.o_bias),
    _layer("attn/q_norm/scale", "self_attn.q_norm.weight", when=lambda c: c.qk_norm),
    _layer("attn/k_norm/scale", "self_attn.k_norm.weight", when=lambda c: c.qk_norm),
    _layer("mlp/gate_proj/kernel", "mlp.gate_proj.weight", linear=True),
    _layer("mlp/up_proj/kernel", "mlp.up_proj.weight", linear=True),
    _layer("mlp/down_proj/kernel", "mlp.down_proj.weight", linear=True),
)


def entries(config: ModelConfig) -> list[Entry]:
  return [e for e in PARAM_TABLE if e.when(config)]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf(
    config: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    place: Optional[Callable[[tuple[str, ...], np.ndarray], jax.Array]] = None,
) -> dict:
  """Builds the param tree leaf by leaf: host numpy -> `place(path, array)` (e.g. a sharded put).

  `get_tensor(hf_name)` returns a host array in HF layout; shapes are checked against the config.
  """
  place = place or (lambda path, x: x)
  shapes = transformer.param_shapes(config)

  def read(name: str, e: Entry) -> np.ndarray:
    x = np.asarray(get_tensor(name))
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
      raise CheckpointError(f"Tensor {name} holds {x.dtype} values, not floats: a quantized checkpoint?")
    return _to_ours(x, e)

  params: dict = {}
  for e in entries(config):
    want = _get(shapes, e.path)
    if e.per_layer:
      value = np.stack([read(e.hf_name.format(i=i), e) for i in range(config.num_layers)])
    else:
      value = read(e.hf_name, e)
    if value.shape != tuple(want.shape):
      raise CheckpointError(
          f"Tensor {e.hf_name} has shape {value.shape} in our layout but the "
          f"config implies {tuple(want.shape)}; the checkpoint and its config.json "
          "disagree."
      )
    _set(params, e.path, place(e.path, value.astype(np.dtype(want.dtype))))
  return params


def params_to_hf(config: ModelConfig, params) -> dict[str, np.ndarray]:
  """HF state dict (host float32 numpy) from our params: the export direction of the same table."""
  out = {}
  for e in entries(config):
    value = np.asarray(jax.device_get(_get(params, e.path)), dtype=np.float32)
    if e.per_layer:
      for i in range(config.num_layers):
        out[e.hf_name.format(i=i)] = _to_hf(value[i], e)
    else:
      out[e.hf_name] = _to_hf(value, e)
  return out


def _to_ours(x: np.ndarray, e: Entry) -> np.ndarray:
  return np.asarray(x).T if e.linear else np.asarray(x)


def _to_hf(x: np.ndarray, e: Entry) -> np.ndarray:
  return np.ascontiguousarray(x.T) if e.linear else x


# ---------------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
  """Memory-mapped safetensors reader (numpy has no bfloat16, so safetensors' numpy backend can't
  read bf16 checkpoints; ml_dtypes can). Validates the header against the file size up front."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
          raise ValueError(f"header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as e:
      raise CheckpointError(
          f"{path}: not a readable safetensors file ({e}). The file is corrupt or "
          "truncated; download or save it again."
      ) from None
    data_start = 8 + header_len
    try:
      header.pop("__metadata__", None)
      for name, info in header.items():
        start, end = info["data_offsets"]
        if data_start + end > size:
          raise CheckpointError(
              f"{path}: tensor {name} ends at byte {data_start + end} but the file "
              f"has {size} bytes: the file is truncated; download or save it again."
          )
        if info["dtype"] not in _ST_DTYPES:
          raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        if end - start != math.prod(info["shape"]) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize:
          raise CheckpointError(f"{path}: tensor {name}'s shape {info['shape']} does not fit its bytes.")
    except CheckpointError:
      raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise CheckpointError(
          f"{path}: the safetensors header is malformed ({type(e).__name__}: {e}); save the file again."
      ) from None
    self._header = header
    self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if header else None

  def keys(self) -> list[str]:
    return list(self._header)

  def get(self, name: str) -> np.ndarray:
    if name not in self._header:
      raise CheckpointError(f"{self.path}: no tensor {name}, which the checkpoint's index places here.")
    info = self._header[name]
    start, end = info["data_offsets"]
    return self._data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def open_safetensors_folder(folder: str) -> dict[str, SafetensorsFile]:
  """{HF tensor name: file holding it} for model.safetensors or else a sharded index (the order
  in which transformers looks for them)."""
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(single):
    st = SafetensorsFile(single)
    return {name: st for name in st.keys()}
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = dict(json.load(f)["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e}).") from None
    missing = sorted(
        name for name in set(weight_map.values()) if not os.path.exists(os.path.join(folder, name))
    )
    if missing:
      raise CheckpointError(
          f"{index} names {missing}, which {'is' if len(missing) == 1 else 'are'} not in {folder}: "
          "download or save the checkpoint again, all its shards."
      )
    files = {name: SafetensorsFile(os.path.join(folder, name)) for name in set(weight_map.values())}
    return {tensor: files[name] for tensor, name in weight_map.items()}
  raise CheckpointError(
      f"{folder}: no model.safetensors or model.safetensors.index.json found; "
      "save the model with safetensors (save_pretrained does by default)."
  )


def read_config(folder: str, dtype: str = "float32") -> ModelConfig:
  path = os.path.join(folder, "config.json")
  if os.path.isfile(folder):
    raise CheckpointError(
        f"{folder} is a file, not a checkpoint folder: pass the folder that holds config.json and "
        "*.safetensors, or a .gguf file."
    )
  if not os.path.isdir(folder):
    raise CheckpointError(
        f"Checkpoint folder {folder} does not exist; pass a folder holding "
        "config.json and *.safetensors, or a .gguf file."
    )
  if not os.path.exists(path):
    raise CheckpointError(
        f"{folder}: no config.json; a HF checkpoint folder needs config.json " "and *.safetensors."
    )
  try:
    with open(path) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e}).") from None
  return config_from_hf(cfg, where=path, dtype=dtype)


def load(folder: str, dtype: str = "float32", place=None) -> tuple[ModelConfig, dict]:
  """(config, params) from a HF checkpoint folder; `place(path, np_array)` puts each leaf."""
  config = read_config(folder, dtype)
  tensors = open_safetensors_folder(folder)

  def get_tensor(name: str) -> np.ndarray:
    if name not in tensors:
      raise CheckpointError(
          f"{folder}: tensor {name} is missing from the checkpoint (the config "
          f"asks for a {config.architecture} with {config.num_layers} layers)."
      )
    return tensors[name].get(name)

  return config, params_from_hf(config, get_tensor, place)
