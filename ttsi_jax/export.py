"""Export to Hugging Face: a merged checkpoint (base + adapter in float32) or a PEFT adapter.

The merged checkpoint is written through the same name table that imports checkpoints
(`checkpoints.hf.PARAM_TABLE`), so a GGUF-loaded model comes out as an ordinary HF folder.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from safetensors.numpy import save_file

from ttsi_jax.checkpoints import hf
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model.transformer import ModelConfig


def save_merged(folder: str, config: ModelConfig, params, adapter: Optional[lora_lib.Adapter] = None,
                tokenizer=None) -> None:
  """config.json + model.safetensors (+ tokenizer and generation config) loadable by
  transformers.AutoModelForCausalLM.from_pretrained."""
  os.makedirs(folder, exist_ok=True)
  if adapter is not None:
    params = lora_lib.merge(config, params, adapter)
  save_file(hf.params_to_hf(config, params), os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"})
  cfg = hf.config_to_hf(config)
  if tokenizer is not None:
    tokenizer.hf.save_pretrained(folder)
    cfg["eos_token_id"] = list(tokenizer.stop_ids)
    cfg["pad_token_id"] = tokenizer.pad_id
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": list(tokenizer.stop_ids), "pad_token_id": tokenizer.pad_id,
                 "do_sample": False}, f, indent=2)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


def save_peft(folder: str, config: ModelConfig, adapter: lora_lib.Adapter,
              base_model: str = "") -> None:
  """adapter_config.json + adapter_model.safetensors loadable by peft.PeftModel.from_pretrained."""
  os.makedirs(folder, exist_ok=True)
  peft_config, tensors = lora_lib.to_peft(config, adapter, base_model)
  save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "adapter_config.json"), "w") as f:
    json.dump(peft_config, f, indent=2)
