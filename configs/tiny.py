"""Tests: the whole loop on a tiny random model (tests set model.path) and 4 BFCL inputs."""

from configs import default


def get_config():
  config = default.get_config()
  config.task.num_examples = 4
  config.wave_size = 2
  config.variants = "base,ttsi,ttsi_icl,all_inputs,certain_only,oracle"
  config.decoding.modes = "direct"  # the whole-loop test turns on majority and pass@k
  config.decoding.num_samples = 2
  # A random model rarely closes a value or a call: bound how long it may write.
  config.decoding.max_value_tokens = 8
  config.decoding.max_args = 3
  config.synthesis.max_request_tokens = 8
  # A random model's requests are word salad: redrawing them only costs time (tested on its own).
  config.synthesis.request_retries = 0
  config.adaptation.epochs = 2
  config.adaptation.adapters_per_call = 64  # a wave's adapters packed in one call, also on CPU
  config.reserve = 256
  # Powers of two only: each wave of a whole run meets new prompt lengths, and on a tiny model a
  # compile costs far more than padding (one-input waves, compiling: 57 s instead of 111 s).
  config.buckets_per_octave = 1
  # One device: the tests' eight simulated CPU devices cost a whole run about 40% more on two
  # cores (experiment_test runs the main job on all eight against one).
  config.mesh_shape = (1, 1, 1)
  return config
