"""Export to Hugging Face: a merged checkpoint (base + adapter in float32) or a PEFT adapter.

  python -m ttsi_jax.export --config=configs/default.py --out=/tmp/hf \
      [--adapter=workdir/adapters/ttsi/multiple_0] [--format=merged|peft]

With --adapter and no --config.model.path the adapter goes onto the base it was trained on.

Without --adapter the base model itself is written as an HF checkpoint (e.g. a GGUF file -> HF).

The merged checkpoint is written through the same name table that imports checkpoints
(`checkpoints.hf.PARAM_TABLE`), so a GGUF-loaded model comes out as an ordinary HF folder.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags
from safetensors.numpy import save_file

from ttsi_jax import checkpoints
from ttsi_jax.checkpoints import hf
from ttsi_jax.checkpoints import orbax as orbax_lib
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model.transformer import ModelConfig
from ttsi_jax.text import tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_ADAPTER = flags.DEFINE_string("adapter", "", "A saved adapter folder (--config.keep_adapters).")
_FORMAT = flags.DEFINE_enum("format", "merged", ["merged", "peft"], "What to write.")
_ALLOW_OTHER_BASE = flags.DEFINE_bool(
    "allow_other_base",
    False,
    "Export --adapter onto --config.model.path though it was trained on another base path (the "
    "same weights moved, or on purpose another model of the same shapes).",
)


def base_for(model_path: str, trained_on: Optional[str], allow_other_base: bool = False) -> str:
  """The base checkpoint to export an adapter onto: the one it was trained on where model.path is
  unset, else model.path, refused where it is another path (shapes alone cannot tell a base from
  its fine-tune: the export would pair the adapter with weights it never saw)."""
  if trained_on is None:  # an adapter saved without its base
    return checkpoints.resolve(model_path)
  if os.path.basename(trained_on) == checkpoints.EMBEDDED_FILE and not os.path.exists(trained_on):
    trained_on = checkpoints.embedded_default_path()  # the embedded default, installed elsewhere here
  if not model_path:
    if not os.path.exists(trained_on):
      raise app.UsageError(
          f"The adapter was trained on {trained_on}, which is not there: give the same weights' "
          "path with --config.model.path and --allow_other_base."
      )
    return trained_on
  base = checkpoints.resolve(model_path)
  if os.path.abspath(trained_on) != base and not allow_other_base:
    raise app.UsageError(
        f"The adapter was trained on {trained_on}, not --config.model.path={base}: leave "
        "model.path unset to export onto its own base, or pass --allow_other_base."
    )
  return base


def save_merged(
    folder: str, config: ModelConfig, params, adapter: Optional[lora_lib.Adapter] = None, tokenizer=None
) -> None:
  """config.json + model.safetensors (+ tokenizer and generation config) loadable by
  transformers.AutoModelForCausalLM.from_pretrained."""
  os.makedirs(folder, exist_ok=True)
  if adapter is not None:
    params = lora_lib.merge(config, params, adapter)
  save_file(
      hf.params_to_hf(config, params), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"}
  )
  cfg = hf.config_to_hf(config)
  if tokenizer is not None:
    tokenizer.hf.save_pretrained(folder)
    cfg["eos_token_id"] = list(tokenizer.stop_ids)
    cfg["pad_token_id"] = tokenizer.pad_id
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
      json.dump(
          {"eos_token_id": list(tokenizer.stop_ids), "pad_token_id": tokenizer.pad_id, "do_sample": False},
          f,
          indent=2,
      )
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


def save_peft(folder: str, config: ModelConfig, adapter: lora_lib.Adapter, base_model: str = "") -> None:
  """adapter_config.json + adapter_model.safetensors loadable by peft.PeftModel.from_pretrained."""
  os.makedirs(folder, exist_ok=True)
  peft_config, tensors = lora_lib.to_peft(config, adapter, base_model)
  save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "adapter_config.json"), "w") as f:
    json.dump(peft_config, f, indent=2)


def main(argv):
  del argv
  if os.path.isdir(_OUT.value) and os.listdir(_OUT.value):  # old weights or adapter files would mix in
    raise app.UsageError(f"--out={_OUT.value} is not empty: give a new or empty folder.")
  config = _CONFIG.value
  adapter = None
  base = checkpoints.resolve(config.model.path)
  if _ADAPTER.value:
    adapter, meta = orbax_lib.load_adapter(_ADAPTER.value)
    base = base_for(config.model.path, meta.get("base_model"), _ALLOW_OTHER_BASE.value)
    if os.path.abspath(str(meta.get("base_model"))) != base:
      logging.warning("Adapter was trained on %s; exporting it onto %s.", meta.get("base_model"), base)
  if _FORMAT.value == "peft":
    if adapter is None:
      raise app.UsageError("--format=peft needs --adapter.")
    save_peft(_OUT.value, checkpoints.read_config(base), adapter, base_model=base)
    if checkpoints.is_gguf(base):  # AutoPeftModel would pass the .gguf path as a folder
      print(
          f"The base is a GGUF file: load it with transformers.AutoModelForCausalLM.from_pretrained("
          f"{os.path.dirname(base)!r}, gguf_file={os.path.basename(base)!r}), then "
          f"peft.PeftModel.from_pretrained(base, {_OUT.value!r}); or export the base alone "
          "(without --adapter) and load that folder."
      )
  else:
    model_config, params = checkpoints.load(base, "float32")
    save_merged(_OUT.value, model_config, params, adapter, tokenizer_lib.load(base))
  print(f"Wrote a {_FORMAT.value} checkpoint to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
