"""Shared fixtures: tiny random HF checkpoints (made with transformers, saved to temp dirs).

Eight simulated CPU devices for every test, so sharding tests run in the same process; single-device
computations simply use device 0.
"""

import atexit
import os
import shutil
import tempfile

# LLVM at -O0: the tests' programs are mostly tiny models', where compiling costs more than
# running (the tau-sweep test, two tiny runs: 57 s instead of 72-86 s; the suite: 815 s instead
# of 962 s). XLA's own passes, and so the math, are the same; the matmuls are library calls
# either way.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
# And the flags the main job adds (no YNNPACK fusions of reductions on CPU): in-process runs then
# sum as the CLI's subprocesses do (with the fusions, a norm's sums differ by float rounding, and
# H's scores of an in-process run and a subprocess's by 1e-6).
from ttsi_jax import runtime  # noqa: E402 (no jax import: before JAX reads the flags)

runtime.set_xla_flags()
# One persistent compilation cache for the session and the subprocesses it starts (CLI, hosts,
# notebook kernel): whole runs repeat the same programs, and compiling dominates on a tiny model.
_XLA_CACHE = tempfile.mkdtemp(prefix="ttsi_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 256

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

# One tiny model per supported variant: untied Llama with Llama-3 RoPE scaling, tied Qwen2 with
# q/k/v biases, Qwen3 with q/k RMSNorm and a head_dim that is not hidden/heads, and Qwen3 with
# attention_bias (q/k/v/o biases).
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(
        **_COMMON,
        tie_word_embeddings=False,
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=24, tie_word_embeddings=False),
    "qwen3_attention_bias": lambda: transformers.Qwen3Config(
        **_COMMON, attention_bias=True, tie_word_embeddings=True
    ),
}
MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "qwen3_attention_bias": transformers.Qwen3ForCausalLM,
}


def _perturb(model, norms: bool):
  """Random init leaves biases (and norms) at 0 (1); perturb them so a run notices them missing."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or (norms and "norm" in name):
        p.add_(0.1 * torch.randn_like(p))
  return model


def make_hf_model(arch: str, seed: int = 0):
  torch.manual_seed(seed)
  return _perturb(MODEL_CLASSES[arch](ARCHS[arch]()).eval(), norms=True)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
  """{arch: (folder, torch model)} for every supported architecture."""
  out = {}
  for arch in ARCHS:
    model = make_hf_model(arch)
    folder = str(tmp_path_factory.mktemp(arch))
    model.save_pretrained(folder)
    out[arch] = (folder, model)
  return out


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def _tiny_chat_checkpoint(folder: str, arch: str) -> str:
  """A tiny random `arch` model with the embedded SmolLM2 tokenizer and chat template."""
  from ttsi_jax.text import tokenizer as tokenizer_lib

  torch.manual_seed(0)
  config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch](
      vocab_size=49152,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=4096,
      tie_word_embeddings=True,
      bos_token_id=1,
      eos_token_id=2,
  )
  _perturb(MODEL_CLASSES[arch](config), norms=False).save_pretrained(folder)
  tokenizer_lib.load(None).hf.save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
  """A tiny random Llama with the embedded SmolLM2 tokenizer (for whole runs)."""
  return _tiny_chat_checkpoint(str(tmp_path_factory.mktemp("tiny_chat")), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_chat_model(tmp_path_factory):
  """The same with Qwen2's q/k/v biases: the architecture the notebook suggests for GPUs."""
  return _tiny_chat_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen2_chat")), "qwen2")
