"""Tokenizers from HF folders and GGUF files: chat prompts, stop ids, and the torch requirement."""

import importlib.util

import pytest

from ttsi_jax import checkpoints
from ttsi_jax.checkpoints import CheckpointError
from ttsi_jax.text import tokenizer as tokenizer_lib


def test_folder_tokenizer_matches_the_gguf_one(tiny_chat_model):
  folder = tokenizer_lib.load(tiny_chat_model)
  gguf = tokenizer_lib.load(None)
  messages = [{"role": "user", "content": "Call get_weather(city='Paris')"}]
  assert folder.encode_chat(messages) == gguf.encode_chat(messages)
  assert folder.chat_prompt(messages).endswith("<|im_start|>assistant\n")
  assert folder.stop_ids == gguf.stop_ids == (2,)
  ids = folder.encode_chat(messages, answer_prefix="[get_weather(")
  assert folder.decode(ids).endswith("assistant\n[get_weather(")


def test_gguf_tokenizer_without_torch_says_what_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "torch" else real(name, *a))
  with pytest.raises(CheckpointError, match=r"\.gguf: transformers reads GGUF tokenizers only with "
                                            r"torch.*ttsi_jax\[hf\]"):
    tokenizer_lib.load(checkpoints.embedded_default_path())
