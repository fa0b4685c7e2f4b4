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
_MODULE_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@flax.struct.dataclass
class Adapter:
  weights: dict  # {"attn": {"q_proj": {"a": [L, in, R], "b": [L, R, out]}, ...}, "mlp": {...}}
  scale: float = flax.struct.field(pytree_node=False)  # alpha / rank
  dropout: float = flax.struct.field(pytree_node=False, default=0.0)


def init(config: transformer.ModelConfig, rng: jax.Array, rank: int = 8, alpha: float = 16.0,
         targets: Sequence[str] = ALL_LINEAR, dropout: float = 0.0, dtype=jnp.float32) -> Adapter:
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
    a = jax.random.uniform(jax.random.fold_in(rng, i), (num_layers, fan_in, rank), dtype, -bound,
                           bound)
    b = jnp.zeros((num_layers, rank, fan_out), dtype)
    weights.setdefault(module, {})[name] = {"a": a, "b": b}
  return Adapter(weights=weights, scale=alpha / rank, dropout=dropout)


def take_padded(adapters: Adapter, start: int, count: int, size: int) -> Adapter:
  """Adapters [start, start + count) of a stacked set, padded to `size` by repeating the last one
  (padding rows are discarded; repeating keeps shapes static without inventing weights)."""
  idx = np.minimum(np.arange(size), count - 1) + start
  return jax.tree.map(lambda x: x[idx], adapters)


def stack(adapters: Sequence[Adapter]) -> Adapter:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def unstack(adapters: Adapter, index: int) -> Adapter:
  return jax.tree.map(lambda x: x[index], adapters)
