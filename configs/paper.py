"""The paper's setting (TT-SI, arXiv 2510.07841): lr 1e-4, free decoding, all BFCL `multiple`.

Use with a bigger model (the paper: Qwen2.5-1.5B-Instruct) via --config.model.path. The sft
baseline (add `sft` to --config.variants) trains on every gold call of its categories here; the
paper's trained on its training split of about 13K SealTool examples.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.task.num_examples = 0
  config.adaptation.learning_rate = 1e-4
  config.decoding.well_formed = False
  config.synthesis.well_formed = False
  config.synthesis.validate = False
  config.sft.num_examples = 0  # every row of sft.categories, not default.py's 32 per category
  config.variants = "base,ttsi,ttsi_icl,icl,all_inputs,certain_only,oracle"
  return config
