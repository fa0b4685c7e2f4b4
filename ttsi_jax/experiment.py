"""The TT-SI run: load model and task, process test inputs in waves, write results, report.

Per wave of inputs, `run_wave` calls one stage after another (see its body):
  prefill the prompts once -> H (`measure`): candidate scores, margin / entropy, flags
  -> base answers -> G (`synthesize`): pairs for the inputs a variant needs (self and/or teacher)
  -> `variants.plan_adapters`: one adapter per data source and input (the variant table decides)
  -> T (`train`): packed training of the wave's adapters
  -> `in_context`: the examples ICL variants show (kept pairs, or the training split's nearest)
  -> `answer_variants`: per-input adapters, the sft baseline and ICL prompts, through one path
  -> check (`_record`) -> one JSON line per input in results.jsonl (flushed per wave).
A run restarted with the same workdir skips the finished waves; every random key is derived from
the seed and the input id, so the resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import gc
import hashlib
import json
import os
import time
import zlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from ttsi_jax import checkpoints, config_schema, multihost, runtime
from ttsi_jax.checkpoints import orbax as orbax_lib
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding
from ttsi_jax.tasks import bfcl
from ttsi_jax.tasks.base import Example, Task
from ttsi_jax.text import constrained
from ttsi_jax.text import sampler as sampler_lib
from ttsi_jax.text.tokenizer import Messages
from ttsi_jax.ttsi import adaptation, answering, demonstrations, synthesis, uncertainty
from ttsi_jax.ttsi import records as records_lib
from ttsi_jax.ttsi import variants as variants_lib

MODES = ("direct", "majority", "pass@k")
TASKS = ("bfcl", "tfds")  # BFCL from its files; any dataset of ttsi_jax.tasks.datasets
STAGES = ("H", "base", "G", "T", "adapted", "check")
SFT_ADAPTER = "sft_adapter"  # in the workdir: the inductive baseline's adapter, trained once


def _names(value, valid: Sequence[str], what: str) -> tuple[str, ...]:
  names = tuple(v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip())
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise ValueError(f"Unknown {what} {unknown or names!r}; valid {what}s are {list(valid)}.")
  if twice := sorted({n for n in names if names.count(n) > 1}):
    raise ValueError(f"The {what}s {twice} are given twice in {value!r}; name each once.")
  return names


def adapt_config(config: ml_collections.ConfigDict) -> adaptation.AdaptConfig:
  """The config's `adaptation` settings as the trainer takes them."""
  a = config.adaptation
  return config_schema.build(
      adaptation.AdaptConfig, a, targets=_names(a.targets, lora_lib.ALL_LINEAR, "LoRA target")
  )


def _check_teacher(t: ml_collections.ConfigDict) -> None:
  """Variant 'ttd' needs a teacher that is fully named (an empty path would load the student)."""
  needed = {"local": ("path",), "endpoint": ("base_url", "model")}.get(t.kind)
  if needed is None:
    raise ValueError(
        "Variant 'ttd' needs a teacher: set --config.teacher.kind to 'local' (with "
        "teacher.path) or 'endpoint' (with teacher.base_url and teacher.model)."
    )
  missing = [f"teacher.{k}" for k in needed if not t[k]]
  if missing:
    raise ValueError(
        f"Teacher kind {t.kind!r} needs {' and '.join(missing)}: set "
        + " ".join(f"--config.{m}=..." for m in missing)
        + "."
    )
  if t.kind == "local" and not os.path.exists(os.path.expanduser(t.path)):  # before the student loads
    raise ValueError(f"teacher.path {t.path} does not exist: give an HF folder or a .gguf file.")


def _kept_ids(value: str, ids: Sequence[str]):
  """config.keep_adapters: "" (none), "all", or comma-separated input ids of this run."""
  if value.strip() == "all":
    kept = "all"
  else:
    kept = {v.strip() for v in value.split(",") if v.strip()}
    unknown = sorted(kept - set(ids))
    if unknown:
      raise ValueError(
          f"keep_adapters names inputs that are not in this run: {unknown}; use ids "
          f"such as {list(ids[:3])}, or 'all'."
      )
  _check_folder_names(kept, ids)
  return kept


def _check_folder_names(kept, ids: Sequence[str]) -> None:
  """Kept adapters go to workdir/adapters/<variant>/<input id>: each id must be one folder name."""
  unsafe = sorted(
      i for i in (ids if kept == "all" else kept) if i in ("", ".", "..") or "/" in i or os.sep in i
  )
  if unsafe:
    raise ValueError(
        f"keep_adapters: the ids {unsafe} are not folder names (kept adapters are saved to "
        "workdir/adapters/<variant>/<id>); keep other inputs, or give these ids without '/'."
    )


def _check_single_calls(
    task: Task, examples: Sequence[Example], variants: Sequence[str], config: ml_collections.ConfigDict
) -> None:
  """Well-formed decoding writes exactly one call: inputs whose answer is several calls (BFCL's
  parallel categories) or none (irrelevance) could never be answered right (nor their pairs be
  written right). Refused where every input is such, warned of (with the count) otherwise."""
  synthesizes = any(variants_lib.TABLE[v].source in ("self", "teacher") for v in variants)
  switched_on = [
      f"{s}.well_formed"
      for s in ("decoding", "synthesis")
      if config[s].well_formed and (s == "decoding" or synthesizes)
  ]
  if not switched_on:
    return

  def calls(ex: Example) -> int:
    try:
      return len(bfcl.parse_calls(task.gold_answer(ex)))
    except bfcl.ParseError:  # a gold answer our format cannot write: its checker still judges
      return 1

  other = [ex.id for ex in examples if calls(ex) != 1]
  if not other:
    return
  what = (
      f"{' and '.join(switched_on)} write exactly one call, but {len(other)} of {len(examples)} inputs "
      f"are answered with several calls or none (e.g. {other[0]})"
  )
  if len(other) == len(examples) and config.decoding.well_formed:
    raise ValueError(
        f"{what}: no answer could be right. Set "
        + " ".join(f"--config.{flag}=false" for flag in switched_on)
        + " for this task."
    )
  logging.warning("%s: their answers (pairs) cannot be right whatever the model knows.", what)


def check_hosts_agree(
    config: ml_collections.ConfigDict, data_version: str, ids: Sequence[str], model_version: str = ""
) -> None:
  """Every host must run one setting on the same inputs: otherwise their rounds, and so their
  collectives, pair up out of order (a hang), or host 0 writes records made under another
  setting. Raises on every host alike (each sees every host's), naming what differs."""
  if jax.process_count() == 1:
    return
  mine = {
      "config": config_schema.flat(json.loads(config.to_json())),
      "data_version": data_version,
      "model_version": model_version,
      "inputs": hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest(),
      "method_version": config_schema.METHOD_VERSION,
  }
  hosts = multihost.allgather_json(mine)
  problems = []
  for host, theirs in enumerate(hosts[1:], 1):
    first, other = hosts[0]["config"], theirs["config"]
    differ = config_schema.result_changing_differences(first, other)
    differ += [k for k in ("keep_adapters",) if first.get(k) != other.get(k)]  # host 0 saves them
    differ += sorted(first.keys() ^ other.keys())  # another ttsi_jax
    differ += [
        w for w in ("data_version", "model_version", "inputs", "method_version") if theirs[w] != hosts[0][w]
    ]
    if differ:
      problems.append(f"host {host} differs from host 0 in {differ}")
  if problems:
    raise ValueError(
        f"The hosts do not run one setting on the same data ({'; '.join(problems)}): give every host "
        "the same config, overrides and data (the same bfcl-eval, data_dir and manual_dir files)."
    )


def bfcl_test_category(task: ml_collections.ConfigDict) -> Optional[str]:
  """The BFCL category a run is scored on: task.category of a BFCL task, <category> of the TFDS
  dataset "bfcl/<category>" (bare "bfcl": TFDS's default config, the first of
  datasets.Bfcl.BUILDER_CONFIGS, which follow bfcl.CATEGORIES); None for any other task."""
  if task.name == "bfcl":
    return task.category
  dataset, _, category = task.dataset.partition("/")
  return (category or bfcl.CATEGORIES[0]) if task.name == "tfds" and dataset == "bfcl" else None


def sft_tasks(config: ml_collections.ConfigDict) -> list[Task]:
  """The training split of the inductive baseline (sft) and of ordinary ICL's demonstrations
  (icl): other BFCL categories, never the test category."""
  categories = _names(config.sft.categories, bfcl.CATEGORIES, "sft category")
  test_category = bfcl_test_category(config.task)
  if test_category in categories:
    raise ValueError(
        f"sft.categories {list(categories)} include the test category "
        f"{test_category!r}; train the baseline on other categories."
    )
  if bfcl.IRRELEVANCE in categories:
    raise ValueError("sft.categories: 'irrelevance' has no gold calls to train on.")
  # A BFCL task's data_dir holds BFCL's files; a TFDS task's is the TFDS folder (sft reads the package's).
  data_dir = (config.task.data_dir or None) if config.task.name == "bfcl" else None
  tasks = [bfcl.BfclTask(c, config.sft.num_examples or None, data_dir) for c in categories]
  if not any(task.examples() for task in tasks):
    raise ValueError(f"sft.categories {list(categories)} hold no usable examples.")
  return tasks


def _request_key(request: str) -> str:
  return " ".join(request.lower().split())


def train_split(tasks: Sequence[Task], test_examples: Sequence[Example]) -> tuple[list, list[str]]:
  """The training split of sft and icl: [(task, example)] of `tasks`, less the examples that ask
  a test input's request (case and spacing aside), and the ids of those held out. BFCL repeats
  requests across categories (half of `multiple` is in `simple_python`; `live_multiple_190-84-0`
  is `multiple_26`): kept, icl would show an input its own gold call, and sft train on it."""
  test_requests = {_request_key(ex.question) for ex in test_examples}
  split, held_out = [], []
  for task in tasks:
    for ex in task.examples():
      if _request_key(ex.question) in test_requests:
        held_out.append(ex.id)
      else:
        split.append((task, ex))
  if held_out:
    logging.warning(
        "%d example(s) of the training split ask a test input's request and are left out of it: %s",
        len(held_out),
        held_out[:10],
    )
  if tasks and not split:
    raise ValueError("The training split (sft.categories) holds no example but the test inputs' own.")
  return split, held_out


def make_task(cfg: ml_collections.ConfigDict) -> Task:
  if cfg.name not in TASKS:
    raise ValueError(f"Unknown task {cfg.name!r}; valid tasks are {list(TASKS)}.")
  if cfg.name == "tfds":  # imported here: TFDS takes seconds to import, BFCL runs need none of it
    from ttsi_jax.tasks import datasets

    return datasets.DatasetTask(
        cfg.dataset, cfg.split, cfg.num_examples or None, cfg.data_dir or None, cfg.manual_dir or None
    )
  return bfcl.BfclTask(cfg.category, cfg.num_examples or None, cfg.data_dir or None)


@dataclasses.dataclass(frozen=True)
class InContext:
  """What an ICL variant shows an input before its request: chat turns of worked examples, and
  the ids of the training split's examples among them (None: pairs written for the input)."""

  turns: Messages
  ids: Optional[list[str]]


# G's output: per data source that writes pairs ("self", "teacher"), per input, what it wrote
# (None where no variant needs it).
WrittenBySource = dict[str, list[Optional[synthesis.Written]]]


def _keys(seed: int, stage: str, names: Sequence) -> jax.Array:
  """keys_B: one key per row, from the seed, the stage and the row's own name (its input id)
  alone, so no sample depends on which inputs share a wave or a batch."""
  return jnp.stack(
      [jax.random.key(zlib.crc32(json.dumps([seed, stage, n]).encode()) & 0x7FFFFFFF) for n in names]
  )


def release_compiled_code_near_map_limit(fraction: float = 0.5) -> bool:
  """Drops JAX's in-memory caches of compiled functions once the process holds more than
  `fraction` of the kernel's memory mappings; returns whether it did.

  Why: XLA:CPU maps each compiled kernel's code and data into the process (about three mappings a
  kernel, a few thousand a training step), and JAX keeps every executable as long as the process
  lives. A run meets new shapes wave after wave: a 100-input run of the default config held
  3,000-5,000 more mappings after each wave of 4 inputs, reached Linux's default limit of 65,530
  in wave 17 and died (LLVM: "Cannot allocate memory", then a segmentation fault). Dropped
  executables are compiled again when next called, the slow ones loaded from the persistent
  compilation cache."""
  maps = runtime.memory_maps()
  if maps is None or maps[0] <= fraction * maps[1]:
    return False
  logging.info("%d of at most %d memory mappings in use: dropping compiled functions", *maps)
  jax.clear_caches()
  gc.collect()  # the executables go with their last references
  return True


class Experiment:

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_schema.validate(config)
    self.config = config
    self.workdir = workdir
    self._workdir_lock = None  # held while run() writes the workdir
    self.variants = _names(config.variants, variants_lib.NAMES, "variant")
    self.modes = _names(config.decoding.modes, MODES, "mode")
    if "ttd" in self.variants:
      _check_teacher(config.teacher)
    self.task = make_task(config.task)
    for row_id, reason in self.task.skipped:
      logging.warning("Skipped malformed row %s: %s", row_id, reason)
    self.examples = self.task.examples()
    if not self.examples:
      raise ValueError(f"Task {self.task.name} has no usable examples.")
    self.keep = _kept_ids(config.keep_adapters, [ex.id for ex in self.examples])
    _check_single_calls(self.task, self.examples, self.variants, config)
    self.uses_sft = any(variants_lib.TABLE[v].answers == "sft" for v in self.variants)
    shows_split = any(variants_lib.TABLE[v].source == "train" for v in self.variants)
    self.sft_tasks = sft_tasks(config) if self.uses_sft or shows_split else []
    # sft's training data and icl's pool: (task, example), and icl's ranking of them by similarity.
    self.train_split, self.held_out = train_split(self.sft_tasks, self.examples)
    self.retriever = demonstrations.Retriever([ex for _, ex in self.train_split]) if shows_split else None
    self._demonstration_cache: dict[int, tuple[Messages, int]] = {}
    # The stage configs too are checked before any model loads.
    self.synth_cfg = config_schema.build(synthesis.SynthesisConfig, config.synthesis)
    self.adapt_cfg = adapt_config(config)
    endpoint = "ttd" in self.variants and config.teacher.kind == "endpoint"
    self.endpoint_cfg = config_schema.build(synthesis.EndpointConfig, config.teacher) if endpoint else None

    # A workdir this run may not continue (another run on it, results of another config) is refused
    # now, not after minutes of loading the model; run() checks again holding the lock, and writes
    # config.json. Host 0 alone, without collectives: `run` gathers a failure from every host.
    if workdir and multihost.is_leader() and os.path.isdir(workdir):
      lock_workdir(workdir).close()
      if self._has_results():
        self._check_config(self._current_config(), warn=False)  # run() warns, once

    # Each host is one data group: its own mesh over its own devices (see ttsi_jax.multihost).
    self.mesh = sharding.make_mesh(config.mesh_shape or None, jax.local_devices())
    model = sampler_lib.load_model(
        config.model.path, config.model.dtype, self.mesh, attention=config.model.attention
    )
    self.model_config, self.params = model.config, model.params
    self.tokenizer, self.sampler = model.tokenizer, model.sampler
    self.examples, too_long = self._inputs_that_fit(self.examples)
    self.skipped = [*self.task.skipped, *too_long]  # (row id, reason): counted in the metrics
    if lost := sorted(set(() if self.keep == "all" else self.keep) & {i for i, _ in too_long}):
      logging.warning(
          "keep_adapters: %s are skipped (their prompt does not fit); none of theirs is saved.", lost
      )
    d = config.decoding
    self.decoder = constrained.CallDecoder(self.sampler, self.tokenizer, d.max_value_tokens, d.max_args)
    self.answerer = answering.Answerer(
        self.task,
        self.sampler,
        self.tokenizer,
        self.decoder,
        d.well_formed,
        d.max_new_tokens,
        d.num_samples,
        d.temperature,
        d.top_p,
    )
    self.self_synth = synthesis.ModelSynthesizer(self.task, self.decoder, self.synth_cfg, config.reserve)
    self.teacher = self._make_teacher() if "ttd" in self.variants else None
    a = config.adaptation
    self.trainer = adaptation.Trainer(self.model_config, self.adapt_cfg)
    self.sft_adapter = None  # trained (or loaded) when the run starts
    # 0 = auto: the whole wave in one packed call on accelerators; one adapter per call on CPU,
    # where the packed call costs the same per adapter at steady state, but the demo's T ran
    # 2-30% slower packed, at 2.5-3x the memory (docs/measured.md).
    self.adapters_per_call = a.adapters_per_call or (1 if jax.default_backend() == "cpu" else 0)

  def _inputs_that_fit(self, examples: list[Example]) -> tuple[list[Example], list[tuple[str, str]]]:
    """(the inputs whose prompt and the reserve fit in the model's context, (id, reason) for the
    others): one such input would stop its wave, and every resume, at the same place."""
    context, reserve = self.model_config.context_length, self.config.reserve
    fit, skipped, shortest = [], [], None
    for ex in examples:
      length = len(self.tokenizer.encode_chat(self.task.prompt(ex)))
      if length + reserve <= context:
        fit.append(ex)
      else:
        reason = f"its prompt of {length} tokens + reserve {reserve} exceed the context of {context}"
        skipped.append((ex.id, reason))
        shortest = min(length, shortest or length)
    if skipped:
      logging.warning(
          "Skipped %d of %d inputs whose prompt does not fit in the model's context with the reserve "
          "(lower config.reserve, or use a model with a longer context): %s",
          len(skipped),
          len(examples),
          [i for i, _ in skipped],
      )
    if not fit:
      raise ValueError(
          f"No input's prompt fits in the model's context of {context} tokens with config.reserve="
          f"{reserve} (the shortest prompt has {shortest} tokens); lower "
          "the reserve, or use a model with a longer context."
      )
    return fit, skipped

  def _make_teacher(self):
    t = self.config.teacher
    if t.kind == "endpoint":
      return synthesis.EndpointSynthesizer(self.task, self.endpoint_cfg, self.synth_cfg)
    teacher = sampler_lib.load_model(t.path, self.config.model.dtype, self.mesh)
    d = self.config.decoding
    decoder = constrained.CallDecoder(teacher.sampler, teacher.tokenizer, d.max_value_tokens, d.max_args)
    return synthesis.ModelSynthesizer(self.task, decoder, self.synth_cfg, self.config.reserve)

  # ------------------------------------------------------------------- the inductive baseline

  def _sft_adapter(self) -> lora_lib.Adapter:
    """The sft variant's adapter: host 0 loads it from the workdir or trains it there (on the gold
    calls of the sft categories) and saves it before any wave uses it; every host gets a copy."""
    path = os.path.join(self.workdir, SFT_ADAPTER)
    settings_path = os.path.join(path, "settings.json")  # written last: the adapter is complete
    c = json.loads(self.config.to_json())
    settings = {
        "sft": c["sft"],
        "model": c["model"],
        "seed": c["seed"],
        "data_dir": c["task"]["data_dir"],
        "data_version": sorted({task.data_version for task in self.sft_tasks}),  # another bfcl-eval
        "model_version": self.model_version,  # other weights at the same path
        # Absent when none is held out, as adapters trained before it was kept.
        **({"held_out": self.held_out} if self.held_out else {}),
        "data_order": "shuffled by the seed",  # adapters trained before took the split's order
        "method_version": config_schema.METHOD_VERSION,
        "adaptation": {
            k: v
            for k, v in c["adaptation"].items()
            if k not in ("learning_rate", "epochs", "batch_size", "adapters_per_call", "row_tokens", "remat")
        },
    }

    def load_or_train() -> dict:
      saved = None
      if os.path.exists(settings_path):
        try:
          with open(settings_path) as f:
            saved = json.load(f)
        except ValueError as e:  # not JSON, or not UTF-8
          logging.warning("sft: %s is unreadable (%s); training the adapter anew.", settings_path, e)
      if isinstance(saved, dict):  # one of a version whose later changes do not touch this run: as now
        version = config_schema.run_fields({**c, "method_version": saved.get("method_version", 1)})
        saved["method_version"] = version["method_version"]
      if saved == settings:
        adapter, _ = orbax_lib.load_adapter(path)
        logging.info("sft: loaded the baseline's adapter from %s", path)
      else:
        if saved is not None:
          logging.warning("sft: %s was trained under other settings; training it anew.", path)
          # Gone before the adapter is overwritten: a run stopped mid-save never finds the old
          # settings beside the new weights.
          os.remove(settings_path)
        data = [
            adaptation.training_example(self.tokenizer, task, ex, ex.question, task.gold_answer(ex))
            for task, ex in self.train_split
        ]
        fits = [d for d in data if len(d[0]) + len(d[1]) <= self.model_config.context_length]
        if len(fits) < len(data):  # their positions or window would pass what the model runs
          logging.warning(
              "sft: %d of %d gold calls are longer than the model's context of %d tokens; left out.",
              len(data) - len(fits),
              len(data),
              self.model_config.context_length,
          )
        # Shuffled once, by the seed: the split comes category by category, and in that order one
        # category would train at the schedule's high rates, the next in its decay (HF's Trainer
        # shuffles too). With sft.epochs > 1 every epoch takes this order.
        data = [fits[i] for i in np.random.default_rng(self.config.seed).permutation(len(fits))]
        if not data:  # an untrained adapter would answer as base, recorded as adapted
          raise ValueError(
              f"sft: none of the training split's gold calls fits the model's context of "
              f"{self.model_config.context_length} tokens; choose other sft.categories."
          )
        sft = self.config.sft
        cfg = dataclasses.replace(
            self.adapt_cfg, learning_rate=sft.learning_rate, epochs=sft.epochs, batch_size=sft.batch_size
        )
        start = time.perf_counter()
        adapters, losses = adaptation.Trainer(self.model_config, cfg).train_all(
            self.params, [data], self.tokenizer.pad_id, _keys(self.config.seed, "sft", ["sft"])
        )
        adapter = lora_lib.unstack(adapters, 0)
        orbax_lib.save_adapter(path, adapter, checkpoints.resolve(self.config.model.path))
        with open(settings_path + ".tmp", "w") as f:  # swapped in whole: never half written
          json.dump(settings, f, indent=2)
        os.replace(settings_path + ".tmp", settings_path)
        per_epoch = -(-len(data) // sft.batch_size)  # steps
        logging.info(
            "sft: trained on %d examples in %.1f s (mean loss of the first epoch %.3f, "
            "of the last %.3f), saved to %s",
            len(data),
            time.perf_counter() - start,
            losses[:per_epoch, 0].mean(),
            losses[-per_epoch:, 0].mean(),
            path,
        )
      return {"weights": jax.device_get(adapter.weights), "scale": adapter.scale, "dropout": adapter.dropout}

    tree, failure = multihost.guarded(load_or_train if multihost.is_leader() else lambda: None)
    if failure:
      failure.throw("to train the sft baseline")
    tree = multihost.allgather_trees([tree] if multihost.is_leader() else [])[0][0]
    weights = jax.device_put(tree["weights"], NamedSharding(self.mesh, P()))  # once, not per call
    return lora_lib.Adapter(weights, float(tree["scale"]), float(tree["dropout"]))

  # ------------------------------------------------------------------------------------ one wave

  def _adapters_to_keep(self, job_of, ids, adapters) -> list[dict]:
    """The adapters of the inputs named in config.keep_adapters as host numpy trees, each once
    with the variants that share it (host 0 saves them, whichever host trained them)."""
    variants_of = collections.defaultdict(list)
    for (v, i), j in job_of.items():
      if self.keep == "all" or ids[i] in self.keep:
        variants_of[(j, i)].append(v)
    kept = []
    for (j, i), variants in variants_of.items():
      adapter = lora_lib.unstack(adapters, j)
      kept.append(
          {
              "variants": variants,
              "id": ids[i],
              "weights": jax.device_get(adapter.weights),
              "scale": adapter.scale,
              "dropout": adapter.dropout,
          }
      )
    return kept

  def _icl_prompt(self, ex: Example, turns: Messages) -> list[int]:
    """The input's prompt with `turns` (shown examples) after its system messages, before its
    conversation (a dataset row can hold earlier turns before its request)."""
    msgs = self.task.prompt(ex)
    start = next((k for k, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
    return self.tokenizer.encode_chat(msgs[:start] + turns + msgs[start:])

  def _demonstration(self, index: int) -> tuple[Messages, int]:
    """Pool example `index` as shown turns (its gold call answering), and at most the tokens they
    add to a prompt (`_added_at_least`)."""
    if index not in self._demonstration_cache:
      task, ex = self.train_split[index]
      turns = task.demonstration(ex, task.gold_answer(ex))
      self._demonstration_cache[index] = (turns, self._added_at_least(turns))
    return self._demonstration_cache[index]

  def _added_at_least(self, turns: Messages) -> int:
    """A lower bound on the tokens `turns` add to a chat prompt: their contents' tokens, less one
    per turn for a merge across a boundary (the template's role markers add more)."""
    return sum(len(self.tokenizer.encode(t["content"])) - 1 for t in turns)

  def _fitting(self, ex: Example, options) -> InContext:
    """The first synthesis.k of `options` ((turns, at least the tokens they add, training id or
    None), in order of preference) that fit in the input's prompt with the reserve; an option
    that would not fit gives way to the next."""
    room = self.model_config.context_length - self.config.reserve
    chosen, turns = [], []
    length = len(self._icl_prompt(ex, []))
    for option, option_length, option_id in options:
      if len(chosen) == self.config.synthesis.k:
        break
      if length + option_length > room:  # cannot fit: no need to encode the whole prompt
        continue
      with_option = len(self._icl_prompt(ex, turns + option))
      if with_option <= room:
        chosen.append(option_id)
        turns, length = turns + option, with_option
    return InContext(turns, chosen)

  def in_context(self, examples, flags, written: WrittenBySource) -> dict[tuple[str, int], InContext]:
    """What each ICL variant shows each input it targets: {(variant, input): InContext}, left out
    where it has nothing to show (the input is answered as base). icl shows the training split's
    nearest examples (synthesis.k, as many as ttsi_icl shows at most); the others the pairs written
    for the input (its own functions: no need to list them again)."""
    shown = {}
    for v in self.variants:
      row = variants_lib.TABLE[v]
      if row.answers != "icl":
        continue
      for i in np.flatnonzero(variants_lib.targets(v, flags)).tolist():
        if row.source == "train":
          options = (
              (*self._demonstration(index), self.train_split[index][1].id)
              for index in self.retriever.ranked(examples[i])
          )
        else:
          pairs = written[row.source][i].kept if written[row.source][i] else []
          options = (
              ([{"role": "user", "content": p.request}, {"role": "assistant", "content": p.call}], 0, None)
              for p in pairs
          )
        context = self._fitting(examples[i], options)
        if context.turns:
          shown[(v, i)] = InContext(context.turns, context.ids if row.source == "train" else None)
    return shown

  def run_wave(self, wave: int, examples: list[Example], timer) -> tuple[list[dict], list[dict]]:
    """(one record per input, the adapters to keep)."""
    seed = self.config.seed
    ids = [ex.id for ex in examples]
    prompts = [self.tokenizer.encode_chat(self.task.prompt(ex)) for ex in examples]
    with timer("H"):
      pre = self.sampler.prefill(prompts, self.config.reserve)
      stats, flags = self.measure(pre, examples)
    with timer("base"):
      base = self.answerer.answers(pre, examples, stats, _keys(seed, "base", ids), self.modes)
    with timer("G"):
      written = self.synthesize(examples, flags)
    plan = variants_lib.plan_adapters(self.variants, flags, self._data_for(examples, written, base))
    with timer("T"):
      adapters, losses = self.train(plan, ids)
      kept = self._adapters_to_keep(plan.job_of, ids, adapters) if plan.jobs else []
      if unkept := kept_without_adapter(self.keep, ids, kept):
        logging.warning(
            "keep_adapters: %s trained no adapter (no variant trained on them: not flagged, or no "
            "training data); nothing is saved for them.",
            unkept,
        )
    with timer("adapted"):
      shown = self.in_context(examples, flags, written)
      adapted = self.answer_variants(plan, adapters, examples, prompts, shown)
    with timer("check"):
      records = [
          self._record(wave, i, ex, stats, flags, base, written, adapted, shown, plan, losses)
          for i, ex in enumerate(examples)
      ]
    return records, kept

  def measure(self, pre, examples: list[Example]) -> tuple[uncertainty.CandidateStats, np.ndarray]:
    """H: the candidate statistics of each input and its uncertainty flag."""
    u = self.config.uncertainty
    stats = self.answerer.score(pre, examples)
    stats = self.answerer.sampled_call_stats(
        pre, examples, stats, _keys(self.config.seed, "H", [ex.id for ex in examples]), u.sampled_candidates
    )
    threshold = u.tau if u.measure == "margin" else u.entropy_threshold
    broken = [ex.id for ex, margin in zip(examples, stats.margin_B) if np.isnan(margin)]
    if broken:
      logging.warning(
          "Inputs %s: a candidate's log-likelihood is NaN (the model's logits are); flagged uncertain.",
          broken,
      )
    return stats, uncertainty.is_uncertain(stats, u.measure, threshold)[: len(examples)]

  def synthesize(self, examples: list[Example], flags: np.ndarray) -> WrittenBySource:
    """G: per data source that writes pairs ("self", "teacher"), per input, what it wrote (None
    where no variant needs it)."""
    written: WrittenBySource = {"self": [None] * len(examples), "teacher": [None] * len(examples)}
    for source, synthesizer in (("self", self.self_synth), ("teacher", self.teacher)):
      chosen = variants_lib.inputs_needing(source, self.variants, flags)
      if not chosen or synthesizer is None:
        continue
      keys = _keys(
          self.config.seed, "synth" if source == "self" else "teacher", [examples[i].id for i in chosen]
      )
      for i, pairs in zip(chosen, synthesizer.synthesize([examples[i] for i in chosen], keys)):
        fitting = [self._within_context(examples[i], p) for p in pairs or []]
        written[source][i] = synthesis.Written(fitting, failed=pairs is None)
    return written

  def _within_context(self, ex: Example, pair: synthesis.Pair) -> synthesis.Pair:
    """The pair, rejected if its training sequence would pass the model's context (a teacher's
    reply is bounded by teacher.max_tokens alone): T would refuse it, and stop the wave."""
    if not pair.kept:
      return pair
    prompt, answer = adaptation.training_example(self.tokenizer, self.task, ex, pair.request, pair.call)
    if len(prompt) + len(answer) <= self.model_config.context_length:
      return pair
    return dataclasses.replace(pair, rejected="the pair is longer than the model's context")

  def _data_for(self, examples, written: WrittenBySource, base: dict):
    """`plan_adapters`'s data_for(source, input): training examples (prompt ids, answer ids)."""

    def data_for(source: str, i: int) -> list:
      ex = examples[i]
      if source in ("gold", "self_label"):  # the input's own request, labelled
        call = self.task.gold_answer(ex) if source == "gold" else base["direct"][i]
        return [adaptation.training_example(self.tokenizer, self.task, ex, ex.question, call)] if call else []
      kept = written[source][i].kept if written[source][i] else []
      return [adaptation.training_example(self.tokenizer, self.task, ex, p.request, p.call) for p in kept]

    return data_for

  def train(self, plan: variants_lib.Plan, ids: Sequence[str]):
    """T: (adapters [jobs, ...], losses [steps, jobs]) for the plan's jobs (on a mesh the stack
    may hold more: `Trainer.train_all`); (None, None) when none.
    Keys by input alone: every data source starts from the same adapter init (and LoRA dropout
    draws the same masks) on an input, so variants differ by their data, not by their random
    draws."""
    if not plan.jobs:
      return None, None
    keys = _keys(self.config.seed, "adapter", [ids[job.input] for job in plan.jobs])
    return self.trainer.train_all(
        self.params, [job.data for job in plan.jobs], self.tokenizer.pad_id, keys, self.adapters_per_call
    )

  def answer_variants(self, plan, adapters, examples, prompts, shown: dict) -> dict:
    """The answers of every variant that does not answer as base: {(variant, input): answers}.
    Each way of answering (the variant table's `answers`) prefills its prompts once: per-input
    adapters, the sft adapter, or ICL prompts with what `in_context` shows; all answer through
    the same `Answerer`."""
    seed, reserve, ids = self.config.seed, self.config.reserve, [ex.id for ex in examples]
    adapted = {}

    def answer(stage, rows, prompts_of_rows, **prefill):
      if not rows:
        return []
      rows_examples = [examples[i] for i in rows]
      pre = self.sampler.prefill(prompts_of_rows, reserve, **prefill)
      stats = self.answerer.score(pre, rows_examples)
      answers = self.answerer.answers(
          pre, rows_examples, stats, _keys(seed, stage, [ids[i] for i in rows]), self.modes
      )
      return [{k: vals[r] for k, vals in answers.items()} for r in range(len(rows))]

    rows = [job.input for job in plan.jobs]  # "adapter": one adapter per job, shared
    by_job = answer("adapted", rows, [prompts[i] for i in rows], lora=adapters, lora_per_row=True)
    for (v, i), j in plan.job_of.items():
      adapted[(v, i)] = by_job[j]
    for v in self.variants:
      row = variants_lib.TABLE[v]
      if row.answers == "sft":  # one adapter, trained before the run, for every input
        rows = list(range(len(examples)))
        answers = answer("sft", rows, prompts, lora=self.sft_adapter)
      elif row.answers == "icl":  # shown examples in the prompt
        rows = [i for (variant, i) in shown if variant == v]
        answers = answer("icl", rows, [self._icl_prompt(examples[i], shown[(v, i)].turns) for i in rows])
      else:
        continue
      adapted.update({(v, i): a for i, a in zip(rows, answers)})
    return adapted

  def _record(
      self, wave, i, ex, stats, flags, base, written: WrittenBySource, adapted, shown, plan, losses
  ) -> records_lib.Record:
    """Input i's line of results.jsonl: its H statistics, base answer, pairs and variants."""
    base_answers = {k: vals[i] for k, vals in base.items()}
    base_answer = records_lib.BaseAnswer(
        base_answers["direct"],
        answering.verdicts(self.task, ex, base_answers, self.modes),
        self.task.check(ex, base_answers["direct"]).error,
        base_answers.get("samples"),
        base_answers["closed"] or None,
    )
    failed = {
        source for source, per_input in written.items() if per_input[i] is not None and per_input[i].failed
    }
    variants = {}
    for v in self.variants:
      if v == "base":
        continue
      answers = adapted.get((v, i))
      if answers is None:
        pairs = written.get(variants_lib.TABLE[v].source, [None] * len(flags))[i]
        reason = variants_lib.not_adapted_reason(
            v, bool(variants_lib.targets(v, flags)[i]), failed, bool(pairs and pairs.kept)
        )
        variants[v] = records_lib.VariantAnswer(
            False,
            base_answer.answer,
            base_answer.correct,
            base_answer.error,
            reason,
            closed=base_answer.closed,
        )
      else:
        variants[v] = records_lib.VariantAnswer(
            True,
            answers["direct"],
            answering.verdicts(self.task, ex, answers, self.modes),
            self.task.check(ex, answers["direct"]).error,
            demonstrations=shown[(v, i)].ids if (v, i) in shown else None,
            closed=answers["closed"] or None,
        )
      if (v, i) in plan.job_of:
        job = plan.job_of[(v, i)]
        # Its own steps (later rows: other adapters' longer runs); a diverged step's NaN stays.
        variants[v].losses = [
            float(x) for x in losses[: self.adapt_cfg.num_steps(len(plan.jobs[job].data)), job]
        ]
        if np.isnan(variants[v].losses).any():
          logging.warning("Input %s, %s: the adapter's training loss is NaN (diverged).", ex.id, v)
    self_written, teacher = written["self"][i], written["teacher"][i]
    n = len(stats.candidates[i])
    return records_lib.Record(
        wave=wave,
        id=ex.id,
        margin=float(stats.margin_B[i]),
        entropy=float(stats.entropy_B[i]),
        candidates=list(stats.candidates[i]),
        probs=[float(p) for p in stats.probs[i][:n]],
        perplexity=[float(p) for p in stats.perplexity[i][:n]],
        uncertain=bool(flags[i]),
        base=base_answer,
        pairs=self_written.pairs if self_written else [],
        variants=variants,
        teacher_pairs=None
        if self.teacher is None or not flags[i]
        else (records_lib.TEACHER_FAILED if teacher and teacher.failed else teacher.pairs if teacher else []),
    )

  # ----------------------------------------------------------------------------------- the run

  def run(self) -> dict:
    """Runs the pending waves (this host's share of them) and returns the run's metrics."""
    try:
      return self._run_waves()
    finally:
      if self._workdir_lock is not None:  # closing the file releases its lock
        self._workdir_lock.close()
        self._workdir_lock = None

  def _run_waves(self) -> dict:
    leader, num_hosts, host = multihost.is_leader(), jax.process_count(), jax.process_index()
    results_path = os.path.join(self.workdir, "results.jsonl")
    wave_size = self.config.wave_size
    waves = [self.examples[i : i + wave_size] for i in range(0, len(self.examples), wave_size)]

    def open_workdir() -> int:  # host 0 owns the workdir; the others learn what it found
      os.makedirs(self.workdir, exist_ok=True)
      self._workdir_lock = lock_workdir(self.workdir)
      self._check_or_write_config()
      return _finished_waves(results_path, waves)

    check_hosts_agree(self.config, self.data_version, [ex.id for ex in self.examples], self.model_version)
    done = multihost.on_leader(open_workdir, f"to open the workdir {self.workdir}")
    if done:
      logging.info("Resuming after %d finished wave(s) in %s", done, results_path)
    if self.uses_sft and done < len(waves):
      self.sft_adapter = self._sft_adapter()
    bars = {
        s: tqdm(
            total=len(self.examples),
            desc=f"{s:>7}",
            position=k,
            leave=True,
            unit="input",
            initial=sum(len(w) for w in waves[:done]),
            disable=not leader,
        )
        for k, s in enumerate(STAGES)
    }
    for round_waves in multihost.rounds(range(done, len(waves)), num_hosts):

      def run_share() -> tuple[list[dict], list[dict]]:  # called at once, in this round
        if host >= len(round_waves):
          return [], []
        w = round_waves[host]
        seconds = collections.defaultdict(float)

        @contextlib.contextmanager
        def timer(stage, size=len(waves[w])):
          start = time.perf_counter()
          yield
          seconds[stage] += time.perf_counter() - start
          bars[stage].update(size)

        records, kept = self.run_wave(w, waves[w], timer)
        peak = runtime.peak_memory_bytes()
        for r in records:
          r.wave_seconds, r.host, r.peak_memory_bytes = dict(seconds), host, peak
        return [r.to_dict() for r in records], kept

      # A wave that raised on one host stops every host; the waves before it are written.
      share, failure = multihost.guarded(run_share)
      records, kept = share or ([], [])
      records_by_host = multihost.allgather_json(records)
      kept_by_host = multihost.allgather_trees(kept)
      written = failure.host if failure else len(records_by_host)
      for bar in bars.values():  # the other hosts' inputs of this round
        bar.update(sum(len(waves[w]) for w in round_waves) - len(records))

      def write():
        # Before the records: a logged wave has its adapters on disk.
        save_kept_adapters(
            self.workdir,
            [k for ks in kept_by_host[:written] for k in ks],
            checkpoints.resolve(self.config.model.path),
        )
        with open(results_path, "a") as out:
          for r in (r for host_records in records_by_host[:written] for r in host_records):
            out.write(json.dumps(r) + "\n")
          out.flush()
          os.fsync(out.fileno())

      multihost.on_leader(write, f"to write {results_path}")
      if failure:
        failure.throw(
            f"on wave {round_waves[failure.host]} (the waves before it are in "
            f"{results_path}; rerun with the same --workdir to resume)"
        )
      release_compiled_code_near_map_limit()
    for bar in bars.values():
      bar.close()

    def report() -> dict:
      records = records_lib.read(results_path)
      metrics = compute_metrics(records, self.variants, self.modes, self.skipped)
      path = os.path.join(self.workdir, "metrics.json")
      with open(path + ".tmp", "w") as f:  # swapped in whole: never half written
        json.dump(metrics, f, indent=2)
      os.replace(path + ".tmp", path)
      print(format_summary(metrics))
      return metrics

    return multihost.on_leader(report, f"to report the metrics of {results_path}")

  @property
  def data_version(self) -> str:
    """What the test inputs and the training split come from (their datasets' or bfcl-eval's
    versions)."""
    return ", ".join(sorted({self.task.data_version, *(task.data_version for task in self.sft_tasks)}))

  @functools.cached_property
  def model_version(self) -> str:
    """The model's files (`checkpoints.fingerprint`): other weights at the same model.path."""
    return checkpoints.fingerprint(self.config.model.path)

  def _current_config(self) -> dict:
    """What config.json records: the config, and what the data and model come from (another
    dataset, bfcl-eval or weights change results under the same config and input ids)."""
    return {
        **json.loads(self.config.to_json()),
        "data_version": self.data_version,
        "model_version": self.model_version,
        "method_version": config_schema.METHOD_VERSION,
        "held_out_of_train_split": self.held_out,
    }

  def _has_results(self) -> bool:
    results = os.path.join(self.workdir, "results.jsonl")
    return os.path.exists(results) and os.path.getsize(results) > 0

  def _check_or_write_config(self):
    """A workdir with results resumes only under a config that gives the same results (settings
    that change only speed may differ); without results, the new config replaces the old."""
    path = os.path.join(self.workdir, "config.json")
    current = self._current_config()
    if self._has_results():
      self._check_config(current)
    with open(path + ".tmp", "w") as f:  # replaced whole: a killed start leaves the old one
      json.dump(current, f, indent=2)
    os.replace(path + ".tmp", path)

  def _check_config(self, current: dict, warn: bool = True) -> None:
    """Raises where the workdir's results ran under a config that gives other results; `warn`:
    of fields added since its config.json was written."""
    path = os.path.join(self.workdir, "config.json")
    if not os.path.exists(path):
      raise ValueError(
          f"{self.workdir} holds results.jsonl but no config.json, so whether its waves ran "
          "under this config cannot be checked: put back the config.json the run wrote beside "
          "it, or use a new --workdir."
      )
    with open(path) as f:
      try:
        previous = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not the JSON config a run writes ({e}); put back the run's own.")
    if not isinstance(previous, dict):
      raise ValueError(
          f"{path} holds a JSON {type(previous).__name__}, not the config a run writes; put back "
          "the run's own."
      )
    before, now = config_schema.run_fields(previous), config_schema.run_fields(current)
    # Fields added since the workdir's config was written act from the next wave on, with their
    # current values; the finished waves ran without them. Fields since removed no longer act.
    added = sorted(now.keys() - before.keys())
    if added and warn:
      logging.warning(
          "%s predates config fields %s: its finished waves ran without them, the waves left "
          "run with their current values.",
          path,
          added,
      )
    changed = config_schema.result_changing_differences(before, now)
    if "method_version" in changed:
      raise ValueError(
          f"{self.workdir} holds results that an earlier ttsi_jax computed differently (method "
          f"version {before['method_version']}, now {now['method_version']}: see "
          "config_schema.METHOD_VERSION); finish it with the version that started it, or use a "
          "new --workdir."
      )
    if changed:
      raise ValueError(
          f"{self.workdir} holds results of a different config (differs in "
          f"{changed}); use a new --workdir or the same config to resume."
      )


def kept_without_adapter(keep, ids: Sequence[str], kept: list[dict]) -> list[str]:
  """The ids of a wave that config.keep_adapters names by id but that trained no adapter."""
  if keep == "all":
    return []
  return sorted({i for i in ids if i in keep} - {k["id"] for k in kept})


def save_kept_adapters(workdir: str, kept: list[dict], base_model: str) -> None:
  """Host 0 saves the kept adapters (gathered from every host) to
  workdir/adapters/<variant>/<id>, for each variant that shares the adapter."""
  for k in kept:
    adapter = lora_lib.Adapter(k["weights"], float(k["scale"]), float(k["dropout"]))
    for variant in k["variants"]:
      orbax_lib.save_adapter(os.path.join(workdir, "adapters", variant, k["id"]), adapter, base_model)


def lock_workdir(workdir: str):
  """An open file holding an exclusive lock on `workdir` until it is closed: a second run on the
  same workdir (a relaunch while the first still runs) would append the same waves twice."""
  path = os.path.join(workdir, ".lock")
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise ValueError(
        f"{workdir} is in use by {holder}: wait for that run to end (or stop it), or use another "
        "--workdir."
    ) from None
  except OSError as e:  # a file system without locks (some network mounts)
    logging.warning("Cannot lock %s (%s): make sure no other run uses this workdir.", path, e)
    return f
  f.seek(0)
  f.truncate()
  f.write(f"a run on {os.uname().nodename}, pid {os.getpid()}\n")
  f.flush()
  return f


def _finished_waves(path: str, waves: list[list[Example]]) -> int:
  """Number of leading waves fully present in results.jsonl; a partial tail (the last wave cut by
  an interruption) is removed. Raises, rather than dropping finished work, on a line that is not a
  record (unless it is the cut last line) and if a finished wave holds other inputs than this
  run's data puts there (the data changed under the workdir)."""
  if not os.path.exists(path):
    return 0
  by_wave = collections.defaultdict(list)
  lines, cut = [], False
  with open(path, encoding="utf-8", errors="surrogateescape") as f:  # a cut tail may hold any bytes
    text = f.readlines()
  for number, line in enumerate(text, 1):
    try:  # read as the metrics will read it: a line resume keeps must not fail them later
      record = records_lib.Record.from_json(line)
      wave, input_id = record.wave, record.id
    except (ValueError, KeyError, TypeError) as e:
      if number == len(text) and not line.endswith("\n"):
        cut = True  # the last line, cut by an interruption: its wave is redone
        break
      raise ValueError(
          f"{path}, line {number}: not a results record ({type(e).__name__}: {e}), so the waves "
          "after it cannot be trusted to resume. Repair or delete that line (`ttsi_jax.ttsi."
          "records` defines the format), or use a new --workdir."
      ) from None
    by_wave[wave].append(input_id)
    if not line.endswith("\n"):  # a whole last record without its newline: the next would join it
      line, cut = line + "\n", True
    lines.append((wave, line))
  done = 0
  while done < len(waves) and by_wave.get(done) == [ex.id for ex in waves[done]]:
    done += 1
  if max(by_wave, default=-1) >= done:  # the first unfinished wave must be the cut last one
    found = by_wave.get(done, [])
    expected = [ex.id for ex in waves[done]] if done < len(waves) else []
    if max(by_wave) > done or found != expected[: len(found)]:
      raise ValueError(
          f"{path}: wave {done} holds inputs {found} but this run's data puts {expected} there; "
          "the data changed under this workdir (bfcl-eval version, task.data_dir). Use a new "
          "--workdir, or move results.jsonl aside to start over."
      )
  keep = [line for wave, line in lines if wave < done]
  if cut or len(keep) < len(lines):
    # Rewritten aside and swapped in, so a kill during the rewrite never loses finished waves.
    with open(path + ".tmp", "w", encoding="utf-8", errors="surrogateescape") as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
  return done


def compute_metrics(records: Sequence[records_lib.Record], variants, modes, skipped) -> dict:
  n = len(records)
  acc = {}
  for v in variants:
    for m in modes:
      correct = [(r.base if v == "base" else r.variants[v]).correct[m] for r in records]
      acc[f"{v}/{m}"] = float(np.mean(correct)) if n else 0.0
  flagged = [r.uncertain for r in records]
  wrong = [not r.base.correct["direct"] for r in records]
  caught = sum(f and w for f, w in zip(flagged, wrong))

  def pair_counts(pairs) -> dict:
    reasons = collections.Counter(p.rejection_kind for p in pairs if p.rejected)
    return {"total": len(pairs), "kept": sum(p.kept for p in pairs), "rejected_by_reason": dict(reasons)}

  teacher = [r.teacher_pairs for r in records if r.teacher_pairs is not None]
  others = [v for v in variants if v != "base"]
  adapted = {v: sum(r.variants[v].adapted for r in records) for v in others}
  fallback = {
      v: collections.Counter(r.variants[v].reason for r in records if not r.variants[v].adapted)
      for v in others
  }
  seconds = collections.defaultdict(float)
  for wave in {r.wave: r.wave_seconds for r in records}.values():
    for stage, s in wave.items():
      seconds[stage] += s
  peaks = [r.peak_memory_bytes for r in records if r.peak_memory_bytes is not None]
  timing = {"seconds_per_stage": dict(seconds), "total_seconds": sum(seconds.values())}
  if peaks:  # the largest of any host's process, over the waves of this results file
    timing["peak_memory_bytes"] = max(peaks)
  return {
      "num_inputs": n,
      "accuracy": acc,
      "flagged_fraction": float(np.mean(flagged)) if n else 0.0,
      "base_wrong": int(sum(wrong)),
      "flag_caught_wrong": int(caught),
      # None where there is nothing to count (no wrong base answer, nothing flagged).
      "flag_recall_of_wrong": caught / sum(wrong) if sum(wrong) else None,
      "flag_precision": caught / sum(flagged) if sum(flagged) else None,
      "pairs": pair_counts([p for r in records for p in r.pairs]),  # self-written
      **(
          {
              "teacher_pairs": {
                  **pair_counts([p for pairs in teacher if isinstance(pairs, list) for p in pairs]),
                  "inputs_teacher_failed": sum(pairs == records_lib.TEACHER_FAILED for pairs in teacher),
              }
          }
          if teacher
          else {}
      ),
      "adapted_inputs": adapted,
      "not_adapted": {v: dict(c) for v, c in fallback.items()},
      "skipped_rows": [list(s) for s in skipped],
      "timing": timing,
  }


def _share(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.1%}"


def format_summary(m: dict) -> str:
  lines = [
      f"inputs: {m['num_inputs']}   flagged: {m['flagged_fraction']:.1%}   base wrong: "
      f"{m['base_wrong']}, of which flagged: {m['flag_caught_wrong']} "
      f"(recall {_share(m['flag_recall_of_wrong'])}, precision {_share(m['flag_precision'])})",
      f"self-written pairs: {m['pairs']['kept']} kept of {m['pairs']['total']}"
      + (f"  rejected: {rejected}" if (rejected := m["pairs"]["rejected_by_reason"]) else ""),
      *(
          [
              f"teacher pairs: {t['kept']} kept of {t['total']}, teacher failed on "
              f"{t['inputs_teacher_failed']} inputs"
              + (f"  rejected: {rejected}" if (rejected := t["rejected_by_reason"]) else "")
          ]
          if (t := m.get("teacher_pairs"))
          else []
      ),
      "",
      f"{'variant/mode':<24}{'accuracy':>10}{'adapted':>10}",
  ]
  for key, value in m["accuracy"].items():
    variant = key.split("/")[0]
    adapted = m["adapted_inputs"].get(variant, "")
    lines.append(f"{key:<24}{value:>10.1%}{adapted:>10}")
  lines += [
      "",
      "seconds per stage: "
      + "  ".join(f"{k} {v:.1f}" for k, v in m["timing"]["seconds_per_stage"].items())
      + f"   total {m['timing']['total_seconds']:.1f}"
      + (f"   peak memory {peak / 2**30:.1f} GiB" if (peak := m["timing"].get("peak_memory_bytes")) else ""),
  ]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  with sampler_lib.buckets_per_octave(config.buckets_per_octave):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  def prepare_data():
    """Host 0 builds the task's dataset first: hosts sharing task.data_dir then find it prepared,
    instead of building (and removing) it at once; a host with a data_dir of its own builds its own."""
    if multihost.is_leader() and config.task.name == "tfds":
      make_task(config.task)

  _, failure = multihost.guarded(prepare_data)
  if failure:
    failure.throw("to prepare the task's data")
  # A host that cannot start (e.g. its copy of the checkpoint is missing) stops every host.
  experiment, failure = multihost.guarded(lambda: Experiment(config, workdir))
  if failure:
    failure.throw("to start")
  return experiment.run()
