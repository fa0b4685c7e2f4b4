"""The paper's setting (TT-SI, arXiv 2510.07841): lr 1e-4, free decoding, all BFCL `multiple`.

Use with a bigger model (the paper: Qwen2.5-1.5B-Instruct) via --config.model.path.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.task.num_examples = 0
  config.adaptation.learning_rate = 1e-4
  config.decoding.well_formed = False
  config.synthesis.well_formed = False
  config.synthesis.validate = False
  config.variants = "base,ttsi,ttsi_icl,all_inputs,certain_only,oracle"
  return config
