"""LoRA adapters as a pytree kept apart from the frozen base params.

An `Adapter` mirrors the linear layers of `params["layers"]`: for every target kernel [L, in, out]
it holds `{"a": [L, in, R], "b": [L, R, out]}` (b = 0 at init, so a fresh adapter is the base model).
Only a and b are pytree leaves; `scale` (alpha / rank) is static, so optimizers and `jax.vmap` over
a leading adapter axis see just the trainable arrays.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ttsi_jax.model import transformer

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE_OF = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@flax.struct.dataclass
class Adapter:
  weights: dict  # {"attn": {"q_proj": {"a": [L, in, R], "b": [L, R, out]}, ...}, "mlp": {...}}
  scale: float = flax.struct.field(pytree_node=False)  # alpha / rank
  dropout: float = flax.struct.field(pytree_node=False, default=0.0)


def init(
    config: transformer.ModelConfig,
    rng: jax.Array,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ALL_LINEAR,
    dropout: float = 0.0,
    dtype=jnp.float32,
) -> Adapter:
  """A fresh adapter: a ~ Kaiming-uniform (as PEFT), b = 0."""
  unknown = sorted(set(targets) - set(ALL_LINEAR))
  if unknown:
    raise ValueError(f"Unknown LoRA targets {unknown}; valid targets are {list(ALL_LINEAR)}.")
  kernels = transformer.param_shapes(config)["layers"]
  weights: dict = {}
  for i, name in enumerate(targets):
    module = _MODULE_OF[name]
    num_layers, fan_in, fan_out = kernels[module][name]["kernel"].shape
    bound = (1.0 / fan_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) as in PEFT's lora_A init
    a = jax.random.uniform(jax.random.fold_in(rng, i), (num_layers, fan_in, rank), dtype, -bound, bound)
    b = jnp.zeros((num_layers, rank, fan_out), dtype)
    weights.setdefault(module, {})[name] = {"a": a, "b": b}
  return Adapter(weights=weights, scale=alpha / rank, dropout=dropout)


def unstack(adapters: Adapter, index: int) -> Adapter:
  return jax.tree.map(lambda x: x[index], adapters)


def _check_fits(config: transformer.ModelConfig, adapter: Adapter) -> None:
  kernels = transformer.param_shapes(config)["layers"]
  for module, targets in adapter.weights.items():
    for name, ab in targets.items():
      if module not in kernels or name not in kernels[module]:
        raise ValueError(f"Adapter tensor {module}/{name} has no matching layer in the base model.")
      L, fan_in, fan_out = kernels[module][name]["kernel"].shape
      a, b = ab["a"].shape, ab["b"].shape
      if a[:2] != (L, fan_in) or b[0] != L or b[2] != fan_out or a[2] != b[1]:
        raise ValueError(
            f"Adapter tensor {module}/{name} has a {tuple(a)} and b {tuple(b)}, which "
            f"do not fit the base kernel [L={L}, in={fan_in}, out={fan_out}]; the "
            "adapter was trained on a different base model."
        )


def merge(config: transformer.ModelConfig, params, adapter: Adapter):
  """Base params with `kernel += scale * a @ b` for every adapted layer, computed and kept in
  float32: a 16-bit kernel would round most of a small update away (bfloat16 keeps 8 bits)."""
  _check_fits(config, adapter)
  merged = dict(params)
  layers = dict(merged["layers"])
  for module, targets in adapter.weights.items():
    layers[module] = dict(layers[module])
    for name, ab in targets.items():
      kernel = layers[module][name]["kernel"]
      delta = (
          jnp.einsum("lir,lro->lio", jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32))
          * adapter.scale
      )
      layers[module][name] = {
          **layers[module][name],
          "kernel": kernel.astype(jnp.float32) + delta,
      }
  merged["layers"] = layers
  return merged


def to_peft(
    config: transformer.ModelConfig, adapter: Adapter, base_model: str = ""
) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json dict, adapter_model.safetensors tensors) in PEFT's LoRA format."""
  _check_fits(config, adapter)
  tensors = {}
  for module, targets in adapter.weights.items():
    hf_module = "self_attn" if module == "attn" else "mlp"
    for name, ab in targets.items():
      a = np.asarray(ab["a"], np.float32)
      b = np.asarray(ab["b"], np.float32)
      for i in range(a.shape[0]):
        prefix = f"base_model.model.model.layers.{i}.{hf_module}.{name}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [R, in]
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, R]
  targets = sorted(n for t in adapter.weights.values() for n in t)
  rank = int(jax.tree.leaves(adapter.weights)[0].shape[-1])
  peft_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": rank,
      "lora_alpha": adapter.scale * rank,
      "lora_dropout": adapter.dropout,
      "bias": "none",
      "target_modules": targets,
      "fan_in_fan_out": False,
      "inference_mode": True,
      "base_model_name_or_path": base_model,
      "use_rslora": False,
  }
  return peft_config, tensors
