"""Tokenizers from HF folders and GGUF files: chat prompts, stop ids, the end-of-turn token, reasoning
blocks, and the torch requirement."""

import importlib.util
import json

import pytest
import transformers

from ttsi_jax import checkpoints
from ttsi_jax.checkpoints import CheckpointError
from ttsi_jax.tasks.bfcl import BfclTask
from ttsi_jax.text import tokenizer as tokenizer_lib
from ttsi_jax.ttsi import adaptation


def test_folder_tokenizer_matches_the_gguf_one(tiny_chat_model):
  folder = tokenizer_lib.load(tiny_chat_model)
  gguf = tokenizer_lib.load(None)
  messages = [{"role": "user", "content": "Call get_weather(city='Paris')"}]
  assert folder.encode_chat(messages) == gguf.encode_chat(messages)
  assert folder.chat_prompt(messages).endswith("<|im_start|>assistant\n")
  assert folder.stop_ids == gguf.stop_ids == (2,)
  # What the published SmolLM2-135M-Instruct tokenizer gives (its tokenizer_config.json's
  # template, vocabulary and special tokens), not only what our two loaders agree on.
  assert gguf.chat_prompt([{"role": "user", "content": "hi"}]) == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
      "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  )
  assert gguf.hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
  assert gguf.hf.vocab_size == 49152 and gguf.encode_chat(messages)[0] == 1
  ids = folder.encode(folder.chat_prompt(messages) + "[get_weather(")
  assert folder.decode(ids).endswith("assistant\n[get_weather(")


def test_a_gguf_tokenizer_is_built_once_and_its_saved_folder_tokenizes_the_same(tmp_path, monkeypatch):
  monkeypatch.setenv("TTSI_JAX_TOKENIZER_DIR", str(tmp_path))
  built = tokenizer_lib.load(None)  # from the GGUF file's vocabulary, then saved
  (folder,) = tmp_path.iterdir()
  assert (folder / "tokenizer.json").exists()
  from_pretrained = transformers.AutoTokenizer.from_pretrained

  def no_gguf(*args, **kwargs):  # the GGUF vocabulary is read once, then the saved folder serves
    assert "gguf_file" not in kwargs, "the GGUF tokenizer was built again"
    return from_pretrained(*args, **kwargs)

  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_gguf)
  cached = tokenizer_lib.load(None)  # from the saved folder
  assert type(cached.hf) is type(built.hf) and cached.stop_ids == built.stop_ids
  texts = ["Hello world", " leading space", "[f(city='Paris', unit=\"C\")]", "ünï 多 \n\n\t x"]
  for text in texts:
    assert cached.encode(text) == built.encode(text)
    assert cached.decode(built.encode(text)) == built.decode(built.encode(text))
  messages = [{"role": "system", "content": "Tools"}, {"role": "user", "content": "Call f"}]
  assert cached.encode(cached.chat_prompt(messages) + "[f(") == built.encode(
      built.chat_prompt(messages) + "[f("
  )
  assert cached.end_of_turn_id == built.end_of_turn_id


def test_gguf_tokenizer_without_torch_says_what_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
  )
  with pytest.raises(
      CheckpointError, match=r"\.gguf: transformers reads GGUF tokenizers only with " r"torch.*ttsi_jax\[hf\]"
  ):
    tokenizer_lib.load(checkpoints.embedded_default_path())


@pytest.mark.parametrize("generation_eos", [[0, 2], None])
def test_training_answers_end_with_the_templates_end_of_turn_not_the_first_eos(tmp_path, generation_eos):
  # As Qwen2.5-Instruct: eos ids [<|endoftext|>=0, <|im_end|>=2]; its chat turns close with 2.
  # Without a generation config (a GGUF), the turn's end still becomes a stop id.
  hf_tok = tokenizer_lib.load(None).hf
  hf_tok.eos_token = "<|endoftext|>"
  hf_tok.save_pretrained(tmp_path)
  if generation_eos:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
  tok = tokenizer_lib.load(str(tmp_path))
  assert tok.stop_ids == (0, 2) and tok.end_of_turn_id == 2
  task = BfclTask("multiple", 1)
  _, answer = adaptation.training_example(tok, task, task.examples()[0], "r", "[f(a=1)]")
  assert answer == tok.encode("[f(a=1)]") + [2]


def test_chat_prompts_switch_thinking_off_where_the_template_can():
  tok = tokenizer_lib.load(None)
  tok.hf.chat_template = (  # Qwen3's generation prompt, reduced to its thinking switch
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
      "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
      "<think>\n\n</think>\n\n{% endif %}"
  )
  assert tok.chat_prompt([{"role": "user", "content": "hi"}]).endswith(
      "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  )


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<think>\nCall f? Maybe [g()].\n</think>\n\n[f(a=1)]", "[f(a=1)]"),
        ("[f(a=1)]", "[f(a=1)]"),
        ("<think>unfinished [g()]", "<think>unfinished [g()]"),
    ],
)
def test_strip_reasoning_keeps_the_answer_after_the_thinking_block(text, answer):
  assert tokenizer_lib.strip_reasoning(text) == answer


def test_the_embedded_tokenizer_writes_every_bfcl_function_alike_alone_and_after_call():
  """G scores each function's name as it follows "Call:" (`scoring.continuation`); the embedded
  byte-level BPE tokenizes it alike alone (its GPT-2 pre-tokenizer splits ":" from " [" whatever
  follows), so runs of the embedded default are untouched by that (config_schema.VERSION_CHANGES[5])."""
  from ttsi_jax.text import scoring

  encode = tokenizer_lib.load(None).encode
  categories = ("multiple", "live_multiple", "parallel_multiple", "simple_python", "live_simple")
  names = {f["name"] for c in categories for ex in BfclTask(c).examples() for f in ex.functions}
  assert len(names) > 500
  for name in names:
    assert scoring.continuation(encode, "Request: Please do it.\nCall:", f" [{name}") == encode(f" [{name}")
