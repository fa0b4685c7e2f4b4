"""Orbax checkpoints restore onto a different device layout; adapters round-trip with metadata."""

import shutil

import jax
import numpy as np
import pytest

from tests.conftest import random_tokens
from ttsi_jax import checkpoints
from ttsi_jax.checkpoints import CheckpointError
from ttsi_jax.checkpoints import orbax as orbax_lib
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding, transformer


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_saved_on_8_devices_restores_on_1_and_back(hf_checkpoints, tmp_path):
  folder = hf_checkpoints["qwen3"][0]
  mesh = sharding.make_mesh((2, 2, 2))
  config, sharded = checkpoints.load(folder, mesh=mesh)
  assert len(jax.tree.leaves(sharded)[3].sharding.device_set) == 8
  orbax_lib.save(str(tmp_path / "from8"), sharded)

  single = orbax_lib.restore_params(str(tmp_path / "from8"), sharded)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(single))
  _assert_equal(single, sharded)

  orbax_lib.save(str(tmp_path / "from1"), single)
  # With the model's config, as checkpoints.load places them (heads whole).
  _, loaded = checkpoints.load(folder, mesh=sharding.make_mesh((1, 2, 4)))
  restored = orbax_lib.restore_params(str(tmp_path / "from1"), single, sharding.make_mesh((1, 2, 4)), config)
  assert jax.tree.map(lambda x: x.sharding.spec, restored) == jax.tree.map(lambda x: x.sharding.spec, loaded)
  resharded = orbax_lib.restore_params(str(tmp_path / "from1"), single, sharding.make_mesh((1, 4, 2)))
  q = resharded["layers"]["attn"]["q_proj"]["kernel"]
  L, d, h = q.shape
  assert len(q.sharding.device_set) == 8
  assert q.addressable_shards[0].data.shape == (L, d // 4, h // 2)  # fsdp=4, tensor=2
  _assert_equal(resharded, single)
  tokens = random_tokens(2, 6)
  positions = np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
  np.testing.assert_allclose(
      np.asarray(transformer.forward(config, resharded, tokens, positions)[0]),
      np.asarray(transformer.forward(config, single, tokens, positions)[0]),
      atol=1e-5,
  )


def test_adapter_round_trips_with_its_metadata(hf_checkpoints, tmp_path):
  config, _ = checkpoints.load(hf_checkpoints["llama"][0])
  adapter = lora_lib.init(
      config, jax.random.key(0), rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "down_proj")
  )
  orbax_lib.save_adapter(str(tmp_path / "a"), adapter, base_model="/models/base")
  restored, meta = orbax_lib.load_adapter(str(tmp_path / "a"))
  _assert_equal(restored, adapter)
  assert (restored.scale, restored.dropout, meta["rank"], meta["base_model"]) == (2.0, 0.1, 4, "/models/base")
  assert sorted(restored.weights) == ["attn", "mlp"]


def test_missing_adapter_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a saved adapter.*keep_adapters"):
    orbax_lib.load_adapter(str(tmp_path))


def test_a_corrupt_adapter_names_the_file_and_what_to_do(hf_checkpoints, tmp_path):
  config, _ = checkpoints.load(hf_checkpoints["llama"][0])
  adapter = lora_lib.init(config, jax.random.key(0), rank=4, targets=("q_proj",))
  path = tmp_path / "a"
  orbax_lib.save_adapter(str(path), adapter, base_model="base")
  meta = path / orbax_lib.ADAPTER_META
  text = meta.read_text()
  meta.write_text(text[: len(text) // 2])  # cut while written
  with pytest.raises(CheckpointError, match=r"adapter.json is corrupt .*delete the folder"):
    orbax_lib.load_adapter(str(path))
  meta.write_text(text)
  shutil.rmtree(path / "weights")
  (path / "weights").mkdir()  # weights lost
  with pytest.raises(CheckpointError, match=r"weights cannot be restored .*delete the folder"):
    orbax_lib.load_adapter(str(path))
