"""Tokenizer and chat template from transformers, for HF folders and GGUF files alike."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from typing import Optional, Sequence

import jinja2
import transformers

from ttsi_jax import checkpoints
from ttsi_jax.checkpoints import CheckpointError

Messages = Sequence[dict]


_PROBE = "ttsi-jax-end-of-turn-probe"


class Tokenizer:
  """A HF tokenizer plus what generation needs: stop ids, a pad id and chat-formatted encoding."""

  def __init__(self, hf_tokenizer, stop_ids: Sequence[int]):
    self.hf = hf_tokenizer
    self.stop_ids = tuple(dict.fromkeys(int(i) for i in stop_ids))  # the tokenizer's eos first
    if not self.stop_ids:
      raise ValueError(
          "The tokenizer defines no end-of-sequence token, so generation could not "
          "stop; set eos_token_id in the checkpoint's generation_config.json."
      )
    pad = hf_tokenizer.pad_token_id
    self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
    self.end_of_turn_id = self._end_of_turn_id()
    if self.end_of_turn_id not in self.stop_ids:  # e.g. a GGUF whose eos is not the turn's end
      self.stop_ids += (self.end_of_turn_id,)

  def _end_of_turn_id(self) -> int:
    """The special token the chat template closes an assistant message with (training answers
    end with it, generation stops at it; e.g. Qwen2.5's <|im_end|>, not its <|endoftext|>); the
    eos where the template shows none."""
    if not self.hf.chat_template:
      return self.stop_ids[0]
    try:
      text = self.hf.apply_chat_template(
          [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}], tokenize=False
      )
    except (jinja2.TemplateError, ValueError):  # a template that renders no assistant turns
      return self.stop_ids[0]
    if _PROBE not in text:
      return self.stop_ids[0]
    special = (
        set(self.stop_ids)
        | set(self.hf.all_special_ids)
        | {i for i, token in self.hf.added_tokens_decoder.items() if token.special}
    )
    after = self.encode(text[text.rfind(_PROBE) + len(_PROBE) :])
    return next((t for t in after if t in special), self.stop_ids[0])

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False)

  def chat_prompt(self, messages: Messages) -> str:
    """The chat-templated text of `messages`, ending where the assistant's answer starts (with
    thinking switched off where the template has the switch, as in Qwen3)."""
    if not self.hf.chat_template:
      raise ValueError(
          "This tokenizer has no chat template; use an instruction-tuned (chat) "
          "checkpoint, or add a chat_template to its tokenizer_config.json."
      )
    return self.hf.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=False, enable_thinking=False
    )

  def encode_chat(self, messages: Messages) -> list[int]:
    return self.encode(self.chat_prompt(messages))

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=True)


def strip_reasoning(text: str) -> str:
  """The answer after a reasoning model's `<think>...</think>` block, as BFCL's Qwen handler reads
  it; text without one is returned as is."""
  _, closed, answer = text.rpartition("</think>")
  return answer.lstrip("\n") if closed else text


def _generation_eos(folder: str) -> list[int]:
  path = os.path.join(folder, "generation_config.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    eos = json.load(f).get("eos_token_id")
  return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def cache_dir() -> pathlib.Path:
  """Where GGUF tokenizers are kept as HF tokenizer folders: `$TTSI_JAX_TOKENIZER_DIR`, else
  ~/.cache/ttsi_jax/tokenizers."""
  return pathlib.Path(
      os.environ.get("TTSI_JAX_TOKENIZER_DIR") or pathlib.Path.home() / ".cache/ttsi_jax/tokenizers"
  )


def _gguf_tokenizer(path: str):
  """transformers' tokenizer of a GGUF file. Building it from the file's vocabulary takes ~11 s
  (the embedded model), so it is saved once as a HF tokenizer folder (loads in ~0.4 s, the same
  ids, decodes and chat template), keyed by the file and the transformers version."""
  stat = os.stat(path)
  key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
  folder = cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:16]
  if (folder / "tokenizer.json").exists():
    return transformers.AutoTokenizer.from_pretrained(folder)
  hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  staging = None
  try:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=folder.parent)
    hf_tok.save_pretrained(staging)
    os.replace(staging, folder)  # atomic, so a folder with tokenizer.json is complete
  except OSError:  # a read-only home, or another process wrote it first: nothing lost
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)
  return hf_tok


def load(path: Optional[str]) -> Tokenizer:
  """The tokenizer of a HF folder or a .gguf file (None: the embedded default)."""
  path = checkpoints.resolve(path)
  if checkpoints.is_gguf(path) and importlib.util.find_spec("torch") is None:
    raise CheckpointError(
        f"{path}: transformers reads GGUF tokenizers only with torch installed; "
        "pip install 'ttsi_jax[hf]' (torch==2.13.0, CPU build)."
    )
  try:
    if checkpoints.is_gguf(path):
      hf_tok = _gguf_tokenizer(path)
      extra: list[int] = []
    else:
      hf_tok = transformers.AutoTokenizer.from_pretrained(path)
      extra = _generation_eos(path)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot load a tokenizer ({e}).") from None
  eos = [hf_tok.eos_token_id] if hf_tok.eos_token_id is not None else []
  return Tokenizer(hf_tok, eos + extra)
