"""The whole TT-SI loop on a tiny random model: every promised field, resume, bad config, TT-D."""

import dataclasses
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import tiny
from ttsi_jax import checkpoints, config_schema, experiment, report, runtime
from ttsi_jax.checkpoints import orbax as orbax_lib
from ttsi_jax.model import transformer
from ttsi_jax.tasks import bfcl
from ttsi_jax.tasks.base import Example
from ttsi_jax.tasks.bfcl import BfclTask
from ttsi_jax.text import tokenizer as tokenizer_lib
from ttsi_jax.ttsi import adaptation, answering, records, synthesis, uncertainty, variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Teacher(http.server.BaseHTTPRequestHandler):
  """OpenAI-compatible endpoint: garbage for requests about `FAIL_ON`, HTTP 401 while `REFUSE` is
  set, a valid pair otherwise."""

  FAIL_ON = ""
  REFUSE = False
  calls: list = []

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    prompt = body["messages"][-1]["content"]
    type(self).calls.append(prompt)
    if self.REFUSE:
      self.send_response(401)
      self.end_headers()
      self.wfile.write(b'{"error": "invalid api key"}')
      return
    if self.FAIL_ON and self.FAIL_ON in prompt:
      payload = b"<html>not json</html>"
    else:
      function = json.loads(prompt.split("Functions available:\n")[1].split("\n\nExample")[0])[0]
      args = ", ".join(f"{p}=1" for p in function["parameters"].get("required", []))
      content = f"Request: please call it\nCall: [{function['name']}({args})]"
      payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.end_headers()
    self.wfile.write(payload)

  def log_message(self, *args):
    pass


@pytest.fixture
def teacher_server():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  _Teacher.calls, _Teacher.REFUSE = [], False
  yield f"http://127.0.0.1:{server.server_address[1]}/v1"
  server.shutdown()


def _config(model, url):
  config = tiny.get_config()
  config.model.path = model
  config.variants = "base,ttsi,ttd,ttsi_icl,all_inputs,certain_only,oracle,self_label"
  config.decoding.modes = "direct,majority,pass@k"
  config.uncertainty.tau = 1.01  # flag every input, so every variant has work on a random model
  # A random model's calls lack required arguments: keep its pairs anyway, so the self-pair
  # variants (ttsi, ttsi_icl, all_inputs) train and answer too. Validation has its own tests.
  config.synthesis.validate = False
  config.teacher.kind = "endpoint"
  config.teacher.base_url = url
  config.teacher.model = "teacher"
  config.teacher.retries = 1
  config.teacher.backoff_s = 0.0
  config.teacher.timeout_s = 5.0
  config.keep_adapters = "multiple_2"
  return config


def test_the_main_job_on_the_default_mesh_writes_what_one_device_writes(tiny_chat_model, tmp_path):
  """The whole loop on the main job's default mesh (the 8 simulated devices on fsdp: prompts,
  packed training rows and per-row adapters split over them, the adapters in training too) gives
  one device's answers, pairs and verdicts, its margins and losses up to float sums' order."""
  config = tiny.get_config()  # as report_test's tau sweep: its programs are the compile cache's
  config.model.path = tiny_chat_model
  config.task.num_examples, config.wave_size = 2, 2
  config.variants, config.decoding.modes = "base,ttsi,all_inputs", "direct"
  config.synthesis.validate = False  # a random model's pairs: keep them, so every input trains
  config.uncertainty.tau = 1.01
  experiment.run(config, str(tmp_path / "one"))
  config.mesh_shape = ()
  experiment.run(config, str(tmp_path / "mesh"))
  one, mesh = (records.read(str(tmp_path / run / "results.jsonl")) for run in ("one", "mesh"))
  assert len(one) == len(mesh) == 2
  for a, b in zip(one, mesh):
    np.testing.assert_allclose(b.margin, a.margin, atol=1e-4)
    assert (b.base.answer, b.base.correct, b.pairs) == (a.base.answer, a.base.correct, a.pairs)
    for v in ("ttsi", "all_inputs"):
      assert b.variants[v].adapted and b.variants[v].answer == a.variants[v].answer
      np.testing.assert_allclose(b.variants[v].losses, a.variants[v].losses, atol=1e-4)


def _without_timing(metrics):
  return {k: v for k, v in metrics.items() if k != "timing"}


def test_tiny_run_writes_every_field_and_resumes(tiny_chat_model, teacher_server, tmp_path, monkeypatch):
  examples = BfclTask("multiple", 4).examples()
  _Teacher.FAIL_ON = examples[1].question
  config = _config(tiny_chat_model, teacher_server)
  workdir = str(tmp_path / "run")
  trained = []  # adapters per training call
  train_all = adaptation.Trainer.train_all
  monkeypatch.setattr(
      adaptation.Trainer,
      "train_all",
      lambda self, params, examples, *a, **k: trained.append(len(examples))
      or train_all(self, params, examples, *a, **k),
  )
  # Wave 0 ends past the memory-mapping limit: the compiled functions are dropped after it and wave 1
  # compiles them again. (The resumed wave 1 below, computed without that, gives the same records.)
  cleared, maps = [], iter([(2, 3)])
  monkeypatch.setattr(runtime, "memory_maps", lambda: next(maps, (1, 3)))
  monkeypatch.setattr(jax, "clear_caches", lambda clear=jax.clear_caches: cleared.append(1) or clear())
  metrics = experiment.run(config, workdir)
  assert len(cleared) == 1  # after wave 0, the one past the limit
  # One adapter per input and data source: ttsi's (all_inputs shares it), oracle's, self_label's,
  # and ttd's where the teacher answered (3 of 4).
  assert sum(trained) == 4 + 4 + 4 + 3

  lines = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  assert [r["id"] for r in lines] == [ex.id for ex in examples]
  for r in lines:
    assert {
        "id",
        "margin",
        "entropy",
        "uncertain",
        "base",
        "pairs",
        "variants",
        "probs",
        "perplexity",
        "candidates",
        "teacher_pairs",
    } <= set(r)
    assert r["candidates"] == [f"[{f['name']}(" for f in examples[lines.index(r)].functions]
    assert {"answer", "correct", "error"} <= set(r["base"]) and len(r["base"]["samples"]) == 2
    # The checker's reason for a wrong direct answer ("" when right), as BFCL's checker says it.
    assert (r["base"]["error"] == "") == r["base"]["correct"]["direct"]
    assert set(r["variants"]) == {
        "ttsi",
        "ttd",
        "ttsi_icl",
        "all_inputs",
        "certain_only",
        "oracle",
        "self_label",
    }
    for v in r["variants"].values():
      assert set(v["correct"]) == {"direct", "majority", "pass@k"}
      assert (v["error"] == "") == v["correct"]["direct"]
    assert r["variants"]["oracle"]["adapted"] and len(r["variants"]["oracle"]["losses"]) == 2
    assert all(r["variants"][v]["adapted"] for v in ("ttsi", "ttsi_icl", "all_inputs"))
    assert len(r["variants"]["ttsi"]["losses"]) == 2 and "losses" not in r["variants"]["ttsi_icl"]
    # self_label trains on one pair of its own (the input and its base answer), not on ttsi's.
    assert r["variants"]["self_label"]["adapted"] and len(r["variants"]["self_label"]["losses"]) == 2
    assert r["variants"]["self_label"]["losses"] != r["variants"]["ttsi"]["losses"]
    # On a flagged input all_inputs trains on ttsi's pairs: one shared adapter, not a second draw.
    assert r["variants"]["all_inputs"] == r["variants"]["ttsi"]
    assert r["variants"]["certain_only"] == {
        **r["variants"]["certain_only"],
        "adapted": False,
        "reason": "not targeted",
    }
  # The teacher failed (garbage after a retry) on input 1: it falls back to the base answer.
  assert lines[1]["teacher_pairs"] == "failed"
  assert lines[1]["variants"]["ttd"] == {
      **lines[1]["variants"]["ttd"],
      "adapted": False,
      "reason": "teacher failed",
      "answer": lines[1]["base"]["answer"],
  }
  assert sum(examples[1].question in c for c in _Teacher.calls) == 2  # first try + one retry
  assert lines[0]["variants"]["ttd"]["adapted"]
  assert metrics["not_adapted"]["ttd"] == {"teacher failed": 1}
  assert metrics["num_inputs"] == 4 and metrics["flagged_fraction"] == 1.0
  assert set(metrics["accuracy"]) == {
      f"{v}/{m}" for v in config.variants.split(",") for m in ("direct", "majority", "pass@k")
  }
  # A call a limit closed says which in its record (a random model's values run past
  # max_value_tokens 8; a variant that answered as base carries the base answer's).
  limit = r"decoding\.max_args \(3\)|no complete value of '\w+' \(within decoding\.max_value_tokens, 8,"
  closed = [
      a["closed"] for r in lines for a in (r["base"], *r["variants"].values(), *r["pairs"]) if "closed" in a
  ]
  assert closed and all(re.match(limit, c) for c in closed)
  # (certain_only answers as base here: tau 1.01 flags every input)
  assert all(r["variants"]["certain_only"].get("closed") == r["base"].get("closed") for r in lines)
  # Validation off keeps every pair, also those it would reject (a random model's calls).
  pairs = [(examples[i], p) for i, r in enumerate(lines) for p in r["pairs"]]
  assert metrics["pairs"] == {"total": len(pairs), "kept": len(pairs), "rejected_by_reason": {}}
  assert any(BfclTask("multiple", 4).validate(ex, p["call"]) for ex, p in pairs)
  assert set(metrics["timing"]["seconds_per_stage"]) == set(experiment.STAGES)
  # Each wave's records carry the process's peak memory by then: it never falls, and the metrics
  # report the largest.
  peaks = [r["peak_memory_bytes"] for r in lines]
  assert peaks == sorted(peaks) and peaks[0] > 100 * 2**20
  assert metrics["timing"]["peak_memory_bytes"] == peaks[-1]
  saved = json.load(open(os.path.join(workdir, "metrics.json")))
  assert _without_timing(saved) == _without_timing(json.loads(json.dumps(metrics)))
  # The report of the run: every section and plot, the tau sweep included (all_inputs ran).
  written = report.write_report(report.load_runs([workdir]), str(tmp_path / "report"))
  report_text = open(written).read()
  for png in ("accuracy.png", "tau.png", "margins.png", "stages.png"):
    assert f"]({png})" in report_text and os.path.getsize(tmp_path / "report" / png) > 5000
  assert "| self_label | adapted inputs | 4.0 |" in report_text
  assert "| ttsi_icl | inputs shown examples | 4.0 |" in report_text  # and no training steps:
  assert "| ttsi | training steps | 8.0 |" in report_text and "| ttsi_icl | training steps" not in report_text
  closed_base = sum("closed" in r["base"] for r in lines)
  assert f"| base answers | 4.0 | {closed_base:.1f} |" in report_text

  # Interrupted during wave 1: its lines are cut. A restart finishes only that wave.
  results = os.path.join(workdir, "results.jsonl")
  text = open(results).read().splitlines(keepends=True)
  with open(results, "w") as f:
    f.writelines(text[:3])
    f.write(text[3][:40])
  # The teacher refuses the key: the run stops with the endpoint's reason, wave 0 kept.
  _Teacher.REFUSE = True
  with pytest.raises(synthesis.TeacherRequestError, match=r"HTTP 401 .*invalid api key"):
    experiment.run(config, workdir)
  assert open(results).read() == "".join(text[:2])  # wave 0's records, the cut line dropped
  _Teacher.REFUSE = False
  calls_before = len(_Teacher.calls)
  resumed = experiment.run(config, workdir)
  assert _without_timing(resumed) == _without_timing(metrics)
  # The redone wave's records equal the first run's (its seconds aside).
  untimed = lambda line: {
      k: v for k, v in json.loads(line).items() if k not in ("wave_seconds", "peak_memory_bytes")
  }
  assert [untimed(l) for l in open(results)] == [untimed(l) for l in text]
  assert all(examples[0].question not in c for c in _Teacher.calls[calls_before:])

  tau, config.uncertainty.tau = config.uncertainty.tau, 0.5  # changes results: refused
  with monkeypatch.context() as m:  # before the model loads (minutes on a large one)
    m.setattr(experiment.sampler_lib, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=r"different config \(differs in \['uncertainty.tau'\]"):
      experiment.run(config, workdir)
  config.uncertainty.tau = tau
  held = experiment.lock_workdir(workdir)  # another run writes it still: refused, nothing touched
  with pytest.raises(ValueError, match=rf"{workdir} is in use by a run on .*, pid {os.getpid()}"):
    experiment.run(config, workdir)
  held.close()
  assert [untimed(l) for l in open(results)] == [untimed(l) for l in text]

  # Kept adapters (only the chosen input's, one per trained variant) export with the CLI.
  kept = sorted(os.listdir(os.path.join(workdir, "adapters")))
  assert set(kept) == {"oracle", "ttd", "ttsi", "all_inputs", "self_label"}  # those that trained on it
  assert all(os.listdir(os.path.join(workdir, "adapters", v)) == ["multiple_2"] for v in kept)
  shared = [
      orbax_lib.load_adapter(f"{workdir}/adapters/{v}/multiple_2")[0].weights for v in ("ttsi", "all_inputs")
  ]  # one adapter, saved for both variants
  jax.tree.map(np.testing.assert_array_equal, *shared)
  out = str(tmp_path / "hf")
  export = lambda: subprocess.run(
      [
          sys.executable,
          "-m",
          "ttsi_jax.export",
          "--config=configs/tiny.py",
          f"--config.model.path={tiny_chat_model}",
          f"--out={out}",
          f"--adapter={workdir}/adapters/oracle/multiple_2",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"},  # one device
  )
  result = export()
  assert result.returncode == 0, result.stderr[-2000:]
  again = export()  # the folder's files would mix with another export's
  assert again.returncode != 0 and f"--out={out} is not empty" in again.stderr
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  adapter, _ = orbax_lib.load_adapter(f"{workdir}/adapters/oracle/multiple_2")
  model_config, params = checkpoints.load(tiny_chat_model)
  tokens = np.arange(1, 13, dtype=np.int32)[None]
  ours, _ = transformer.forward(model_config, params, tokens, tokens - 1, lora=adapter)
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)


def test_compiled_functions_are_dropped_only_past_the_share_of_the_mapping_limit(monkeypatch):
  double = jax.jit(lambda x: 2 * x)
  double(np.ones(3))
  monkeypatch.setattr(runtime, "memory_maps", lambda: (70, 100))
  assert not experiment.release_compiled_code_near_map_limit(fraction=0.75)
  assert double._cache_size() == 1
  assert experiment.release_compiled_code_near_map_limit(fraction=0.5)
  assert double._cache_size() == 0
  monkeypatch.setattr(runtime, "memory_maps", lambda: None)  # a platform that does not say
  assert not experiment.release_compiled_code_near_map_limit(fraction=0.0)


def test_self_label_trains_on_the_inputs_own_request_answered_by_the_base_model(tiny_chat_model):
  task = BfclTask("multiple", 2)
  examples = task.examples()
  owner = types.SimpleNamespace(tokenizer=tokenizer_lib.load(tiny_chat_model), task=task)
  base = {"direct": ["[f(a=1)]", ""]}
  data_for = experiment.Experiment._data_for(owner, examples, {"self": [None, None]}, base)
  prompt, answer = data_for("self_label", 0)[0]
  assert prompt == owner.tokenizer.encode_chat(task.prompt(examples[0]))  # the input's own request
  assert answer == owner.tokenizer.encode("[f(a=1)]") + [owner.tokenizer.end_of_turn_id]
  assert data_for("self_label", 1) == []  # nothing to learn from an empty answer
  assert variants.not_adapted_reason("self_label", True, set()) == "empty base answer"
  plan = variants.plan_adapters(["ttsi", "self_label", "oracle"], np.array([True, True]), data_for)
  assert [(job.source, job.input) for job in plan.jobs] == [("self_label", 0), ("gold", 0), ("gold", 1)]


def test_each_variant_answers_with_its_own_inputs_adapter():
  """The wave's wiring from adapter jobs to answers (`answer_variants`): row r of the per-row
  prefill carries job r's adapter and input, and (variant, input) gets its job's answer. The
  model is replaced by stand-ins that write which prompt and adapter a row answered with."""
  flags = np.array([True, False, True])
  data_for = lambda source, i: [] if (source, i) == ("self_label", 2) else [(source, i)]
  names = ["ttsi", "all_inputs", "oracle", "self_label", "certain_only"]
  plan = variants.plan_adapters(names, flags, data_for)
  adapters = np.arange(len(plan.jobs)) * 10  # job j's "adapter" is 10 j

  def prefill(prompts, reserve, lora=None, lora_per_row=False):
    assert lora_per_row and len(prompts) == len(lora)
    return [f"{p}/adapter {a}" for p, a in zip(prompts, lora)]

  owner = types.SimpleNamespace(
      config=types.SimpleNamespace(seed=0, reserve=8),
      variants=names,
      modes=("direct",),
      sampler=types.SimpleNamespace(prefill=prefill),
      answerer=types.SimpleNamespace(score=lambda pre, ex: None, answers=lambda pre, *a: {"direct": pre}),
  )
  examples = [Example(f"x{i}", "q", ()) for i in range(3)]
  adapted = experiment.Experiment.answer_variants(owner, plan, adapters, examples, ["p0", "p1", "p2"], {})
  job = lambda source, i: next(j for j, job in enumerate(plan.jobs) if (job.source, job.input) == (source, i))
  expected = {
      ("ttsi", 0): f"p0/adapter {10 * job('self', 0)}",
      ("ttsi", 2): f"p2/adapter {10 * job('self', 2)}",
      ("all_inputs", 0): f"p0/adapter {10 * job('self', 0)}",  # ttsi's adapter where it has one
      ("all_inputs", 1): f"p1/adapter {10 * job('self', 1)}",
      ("all_inputs", 2): f"p2/adapter {10 * job('self', 2)}",
      ("oracle", 0): f"p0/adapter {10 * job('gold', 0)}",
      ("oracle", 1): f"p1/adapter {10 * job('gold', 1)}",
      ("oracle", 2): f"p2/adapter {10 * job('gold', 2)}",
      ("self_label", 0): f"p0/adapter {10 * job('self_label', 0)}",  # none on 2: no data
      ("certain_only", 1): f"p1/adapter {10 * job('self', 1)}",
  }
  assert {key: a["direct"] for key, a in adapted.items()} == expected


def test_ttd_with_a_local_teacher_trains_on_the_teachers_pairs(
    tiny_chat_model, tiny_qwen2_chat_model, tmp_path, monkeypatch
):
  trained = []
  train_all = adaptation.Trainer.train_all
  monkeypatch.setattr(
      adaptation.Trainer,
      "train_all",
      lambda self, params, examples, *a, **k: trained.extend(examples)
      or train_all(self, params, examples, *a, **k),
  )
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  config.task.num_examples = 1
  config.variants = "base,ttd"
  config.decoding.modes = "direct"
  config.uncertainty.tau = 1.01
  config.synthesis.validate = False  # keep the random teacher's pairs
  config.teacher.kind, config.teacher.path = "local", tiny_qwen2_chat_model
  run = experiment.Experiment(config, str(tmp_path))
  # The teacher is the second checkpoint, not the student.
  assert run.teacher.sampler.config.qkv_bias and not run.model_config.qkv_bias
  metrics = run.run()
  (record,) = [json.loads(l) for l in open(tmp_path / "results.jsonl")]
  assert len(record["teacher_pairs"]) == 1 and record["teacher_pairs"][0]["call"].startswith("[")
  # The teacher's pairs are counted apart from the (here absent) self-written ones.
  assert metrics["pairs"]["total"] == 0
  assert metrics["teacher_pairs"] == {
      "total": 1,
      "kept": 1,
      "rejected_by_reason": {},
      "inputs_teacher_failed": 0,
  }
  assert record["variants"]["ttd"]["adapted"] and len(record["variants"]["ttd"]["losses"]) == 2
  # Its one adapter trained on the teacher's pair: the input's prompt with the teacher's request,
  # answered by the teacher's call.
  (ex,), pair = run.task.examples(), record["teacher_pairs"][0]
  assert trained == [
      [adaptation.training_example(run.tokenizer, run.task, ex, pair["request"], pair["call"])]
  ]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("variants", "base,ttsi,magic", r"Unknown variant \['magic'\].*'ttsi_icl'"),
        ("variants", "base,ttsi, ttsi", r"variants \['ttsi'\] are given twice in 'base,ttsi, ttsi'"),
        ("decoding.modes", "direct,best", r"Unknown mode \['best'\].*'pass@k'"),
        ("task.name", "sealtool", r"Unknown task 'sealtool'.*'bfcl'"),
        ("task.category", "multi", r"'multi'.*multiple"),
        (
            "keep_adapters",
            "multiple_0, multiple_O",
            r"not in this run: \['multiple_O'\]; use ids such as \['multiple_0'",
        ),
        ("wave_size", 0, r"wave_size=0 \(valid: an integer >= 1\)"),
        ("buckets_per_octave", 3, r"buckets_per_octave=3 \(valid: one of \[1, 2, 4\]\)"),
        ("adaptation.learning_rate", -1.0, r"adaptation.learning_rate=-1.0 \(valid: a number > 0\)"),
    ],
)
def test_bad_settings_fail_at_start_and_say_what_is_valid(field, value, message, tmp_path):
  config = tiny.get_config()
  config.model.path = str(tmp_path / "no_model_here")  # loading it would fail with another error
  section, _, name = field.rpartition(".")
  setattr(config[section] if section else config, name, value)
  with pytest.raises(ValueError, match=message):
    experiment.Experiment(config, str(tmp_path))


def test_inputs_whose_prompt_does_not_fit_the_context_are_skipped_and_counted(tiny_chat_model, tmp_path):
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  config.variants, config.decoding.max_new_tokens = "base", 8
  config.decoding.well_formed = False
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  examples = BfclTask("multiple", 4).examples()
  lengths = [len(tokenizer.encode_chat(BfclTask("multiple", 4).prompt(ex))) for ex in examples]
  assert len(set(lengths)) == len(lengths)  # with these inputs: one longest
  context = checkpoints.read_config(tiny_chat_model).context_length
  config.reserve = context - max(lengths) + 1  # the longest prompt and the reserve pass the context
  metrics = experiment.run(config, str(tmp_path / "run"))  # the others run
  longest = examples[lengths.index(max(lengths))].id
  assert metrics["num_inputs"] == 3
  assert metrics["skipped_rows"] == [
      [
          longest,
          f"its prompt of {max(lengths)} tokens + reserve {config.reserve} exceed the context of {context}",
      ]
  ]
  config.reserve = context - min(lengths) + 1
  with pytest.raises(
      ValueError, match=rf"No input's prompt fits .* \(the shortest prompt has {min(lengths)} "
  ):
    experiment.Experiment(config, str(tmp_path / "none"))


def test_well_formed_decoding_is_warned_of_where_some_answers_are_not_one_call(caplog):
  task = BfclTask("parallel", 1)
  examples = [*task.examples(), *BfclTask("multiple", 1).examples(), *BfclTask("irrelevance", 1).examples()]
  config = tiny.get_config()
  with caplog.at_level(logging.WARNING):
    experiment._check_single_calls(task, examples, ["base", "ttsi"], config)
  assert "write exactly one call, but 2 of 3 inputs" in caplog.text
  # Well-formed pairs alone, on a task of several calls only: a warning, not a refusal.
  config.decoding.well_formed = False
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    experiment._check_single_calls(task, examples[:1], ["base", "ttsi"], config)
  assert "synthesis.well_formed write exactly one call, but 1 of 1" in caplog.text
  caplog.clear()
  experiment._check_single_calls(task, examples[:1], ["base", "oracle"], config)  # nothing synthesized
  assert not caplog.text


@pytest.mark.parametrize("ids", [["a", "../../x"], ["a", "."], ["a", ""]])
def test_kept_adapters_need_ids_that_are_folder_names(ids):
  with pytest.raises(ValueError, match=r"keep_adapters: the ids .* are not folder names"):
    experiment._check_folder_names("all", ids)
  experiment._check_folder_names({"a"}, ids)  # only the kept inputs' ids count
  experiment._check_folder_names("", ids)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"adaptation.targets": "q_proj,k_porj"}, r"Unknown LoRA target \['k_porj'\]"),
        (
            {
                "variants": "base,ttd",
                "teacher.kind": "endpoint",
                "teacher.base_url": "http://localhost:1",
                "teacher.model": "m",
                "teacher.request_json": "{max_tokens: 1}",
            },
            "teacher.request_json is not valid JSON",
        ),
        (
            {"task.category": "parallel"},
            r"decoding.well_formed and synthesis.well_formed write exactly one call, but 4 of 4 inputs "
            r"are answered with several calls or none \(e.g. parallel_0\): no answer could be right. "
            r"Set --config.decoding.well_formed=false --config.synthesis.well_formed=false",
        ),
    ],
)
def test_stage_settings_are_checked_before_the_model_loads(settings, message, tmp_path):
  config = tiny.get_config()
  config.model.path = str(tmp_path / "no_model_here")  # loading it would fail with another error
  for field, value in settings.items():
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
  with pytest.raises(ValueError, match=message):
    experiment.Experiment(config, str(tmp_path))


@pytest.mark.parametrize(
    "variant,section,settings,message",
    [
        ("ttd", "teacher", {}, "needs a teacher"),
        ("ttd", "teacher", {"kind": "local"}, r"'local' needs teacher.path: set --config.teacher.path=..."),
        (
            "ttd",
            "teacher",
            {"kind": "local", "path": "/no/teacher"},
            r"teacher.path /no/teacher does not exist",
        ),
        ("ttd", "teacher", {"kind": "endpoint", "model": "m"}, r"'endpoint' needs teacher.base_url: set"),
        ("ttd", "teacher", {"kind": "endpoint"}, "needs teacher.base_url and teacher.model"),
        ("sft", "sft", {"categories": "live_simple,multiple"}, r"include the test category 'multiple'"),
        ("sft", "sft", {"categories": "irrelevance"}, "'irrelevance' has no gold calls"),
        ("sft", "sft", {"categories": "live_simpel"}, r"Unknown sft category \['live_simpel'\]"),
    ],
)
def test_a_variants_missing_or_bad_settings_are_explained_at_start(
    variant, section, settings, message, tmp_path
):
  config = tiny.get_config()
  config.model.path = str(tmp_path / "no_model_here")  # loading it would fail with another error
  config.variants = f"base,{variant}"
  config[section].update(settings)
  with pytest.raises(ValueError, match=message):
    experiment.Experiment(config, str(tmp_path))


def test_sft_refuses_the_test_category_of_a_tfds_bfcl_run_and_reads_bfcl_from_the_package(tmp_path):
  config = tiny.get_config()
  config.task.name, config.task.dataset = "tfds", "bfcl/live_simple"
  config.task.data_dir = str(tmp_path)  # the TFDS folder: no BFCL files in it
  config.sft.categories = "live_simple,multiple"
  with pytest.raises(ValueError, match=r"include the test category 'live_simple'"):
    experiment.sft_tasks(config)
  config.sft.categories = "multiple"
  config.sft.num_examples = 1
  (task,) = experiment.sft_tasks(config)
  assert task.examples()[0].id.startswith("multiple_")
  config.task.dataset = "user_tools"
  assert experiment.bfcl_test_category(config.task) is None
  # Bare "bfcl" loads TFDS's default config, the first category: its test inputs are refused too.
  config.task.dataset, config.sft.categories = "bfcl", bfcl.CATEGORIES[0]
  with pytest.raises(ValueError, match=rf"include the test category '{bfcl.CATEGORIES[0]}'"):
    experiment.sft_tasks(config)


def test_the_training_split_holds_out_the_test_inputs_requests(caplog):
  # BFCL repeats requests across categories: live_multiple_190-84-0 asks multiple_26's request.
  tests = bfcl.BfclTask("multiple", 30).examples()
  live = bfcl.BfclTask("live_multiple")
  with caplog.at_level(logging.WARNING):
    split, held_out = experiment.train_split([live], tests)
  assert held_out == ["live_multiple_190-84-0"] and "1 example(s) of the training split" in caplog.text
  assert len(split) == len(live.examples()) - 1
  requests = {ex.question for ex in tests}
  assert not any(ex.question in requests for _, ex in split)
  # Case and spacing aside.
  pool = [Example("a", "Get the  Weather in Paris.", ()), Example("b", "Other.", ())]
  task = type("Pool", (), {"examples": lambda self: pool})()
  split, held_out = experiment.train_split([task], [Example("t", "get the weather in paris. ", ())])
  assert held_out == ["a"] and [ex.id for _, ex in split] == ["b"]
  with pytest.raises(ValueError, match="holds no example but the test inputs' own"):
    experiment.train_split([task], [Example(ex.id, ex.question, ()) for ex in pool])


def test_sft_baseline_trains_once_on_other_categories_and_answers_every_input(
    tiny_chat_model, tmp_path, monkeypatch, caplog
):
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  config.variants = "base,sft"
  config.decoding.modes = "direct"
  config.task.num_examples, config.wave_size = 2, 1
  config.decoding.well_formed, config.decoding.max_new_tokens = False, 8  # fewer programs
  config.sft.categories = "simple_python,live_simple"
  config.sft.num_examples = 2
  config.sft.epochs = 2
  config.sft.batch_size = 2
  config.sft.learning_rate = 1e-2
  trained = []
  train_all = adaptation.Trainer.train_all
  monkeypatch.setattr(
      adaptation.Trainer,
      "train_all",
      lambda self, *a, **k: trained.append(self.cfg) or data.append(a[1]) or train_all(self, *a, **k),
  )
  data = []
  workdir = str(tmp_path / "run")
  metrics = experiment.run(config, workdir)
  # One adapter with the sft settings, on the 2 + 2 gold calls of the training categories.
  (cfg,) = trained
  assert (cfg.learning_rate, cfg.epochs, cfg.batch_size) == (1e-2, 2, 2)
  ((pairs,),) = data
  # Gold calls longer than the model's context are left out (their positions would pass it).
  longest = max(len(p) + len(a) for p, a in pairs)
  short = experiment.Experiment(config, str(tmp_path / "short"))
  short.model_config = dataclasses.replace(short.model_config, max_position_embeddings=longest - 1)
  with caplog.at_level(logging.WARNING):
    short._sft_adapter()
  assert len(data[-1][0]) == len(pairs) - 1 and "1 of 4 gold calls are longer than" in caplog.text
  shortest = experiment.Experiment(config, str(tmp_path / "shortest"))
  shortest.model_config = dataclasses.replace(shortest.model_config, max_position_embeddings=8)
  with pytest.raises(ValueError, match="sft: none of the training split's gold calls fits"):
    shortest._sft_adapter()  # not an untrained adapter recorded as adapted
  data[1:], trained[1:] = [], []
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  gold = [t.gold_answer(ex) for t in experiment.sft_tasks(config) for ex in t.examples()]
  assert len(gold) == 4 and len({*gold}) == 4
  # Shuffled by the seed, not category by category (the schedule would favour one category).
  order = np.random.default_rng(config.seed).permutation(4)
  assert list(order) != sorted(order)
  assert [answer for _, answer in pairs] == [
      tokenizer.encode(gold[i]) + [tokenizer.end_of_turn_id] for i in order
  ]
  assert cfg.rank == config.adaptation.rank
  adapter, meta = orbax_lib.load_adapter(os.path.join(workdir, experiment.SFT_ADAPTER))
  assert meta["base_model"] == tiny_chat_model
  assert all(
      np.abs(np.asarray(pair["b"])).max() > 0  # trained away from b = 0
      for targets in adapter.weights.values()
      for pair in targets.values()
  )
  lines = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  assert len(lines) == 2 and all(r["variants"]["sft"]["adapted"] for r in lines)
  assert metrics["adapted_inputs"]["sft"] == 2
  # Cut after wave 0: the restart loads the saved adapter (no training) and answers the same.
  path = os.path.join(workdir, "results.jsonl")
  with open(path, "w") as f:
    f.write(json.dumps(lines[0]) + "\n")
  resumed = experiment.run(config, workdir)
  assert len(trained) == 1
  assert _without_timing(resumed) == _without_timing(metrics)
  again = [json.loads(l) for l in open(path)]
  assert [r["variants"]["sft"] for r in again] == [r["variants"]["sft"] for r in lines]
  # Under other settings the saved adapter is not reused: it is trained again (the stage alone; no
  # results to continue, which another config could not).
  os.remove(path)
  config.sft.learning_rate = 5e-3
  stage = experiment.Experiment(config, workdir)  # one model load for the checks below
  stage._sft_adapter()
  assert len(trained) == 2 and trained[-1].learning_rate == 5e-3
  # Nor on another version of the training split's data (another bfcl-eval).
  version, stage.sft_tasks[0].data_version = stage.sft_tasks[0].data_version, "bfcl-eval 0.0.1"
  stage._sft_adapter()
  assert len(trained) == 3
  stage.sft_tasks[0].data_version = version
  stage._sft_adapter()  # back on this version's data
  del trained[2:]
  # Under a later method version, anew where its change touches this run, else reused.
  later = config_schema.METHOD_VERSION + 1
  for touches_this_run, count in ((False, 2), (True, 3)):
    with monkeypatch.context() as m:
      m.setattr(config_schema, "METHOD_VERSION", later)
      m.setattr(
          config_schema,
          "VERSION_CHANGES",
          {**config_schema.VERSION_CHANGES, later: lambda f: touches_this_run},
      )
      stage._sft_adapter()
    assert len(trained) == count
  stage._sft_adapter()  # trained under the version of now
  del trained[2:]
  # A run stopped while training anew leaves no settings that would vouch for other weights.
  settings = os.path.join(workdir, experiment.SFT_ADAPTER, "settings.json")
  config.sft.learning_rate = 4e-3
  counting = adaptation.Trainer.train_all

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(adaptation.Trainer, "train_all", interrupted)
  with pytest.raises(KeyboardInterrupt):
    experiment.Experiment(config, workdir)._sft_adapter()
  assert not os.path.exists(settings)
  monkeypatch.setattr(adaptation.Trainer, "train_all", counting)
  experiment.Experiment(config, workdir)._sft_adapter()
  assert len(trained) == 3
  # A settings file cut while written: the adapter is trained again, not a JSON traceback.
  with open(settings, "r+") as f:
    f.truncate(len(f.read()) // 2)
  with caplog.at_level(logging.WARNING):
    experiment.Experiment(config, workdir)._sft_adapter()
  assert len(trained) == 4 and "settings.json is unreadable" in caplog.text


def test_a_run_records_what_its_training_split_held_out(tiny_chat_model, tmp_path):
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  config.variants, config.task.category, config.task.num_examples = "base,icl", "multiple", 27
  config.sft.categories, config.sft.num_examples = "live_multiple", 0
  workdir = str(tmp_path / "run")
  run = experiment.Experiment(config, workdir)
  assert run.held_out == ["live_multiple_190-84-0"]  # multiple_26's request
  assert "live_multiple_190-84-0" not in {ex.id for ex in run.retriever.pool}
  os.makedirs(workdir)
  run._check_or_write_config()
  with open(os.path.join(workdir, "config.json")) as f:
    written = json.load(f)
  assert written["held_out_of_train_split"] == ["live_multiple_190-84-0"]
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    f.write("{}\n")
  # The training split's data is part of what the run computed from: another version is refused.
  version = run.sft_tasks[0].data_version
  run.sft_tasks[0].data_version = "bfcl-eval 0.0.1"
  with pytest.raises(ValueError, match=r"differs in \['data_version'\]"):
    run._check_or_write_config()
  run.sft_tasks[0].data_version = version
  # A workdir an earlier ttsi_jax started (it showed the held-out example): not resumed.
  del written["held_out_of_train_split"]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(written, f)
  with pytest.raises(ValueError, match=r"differs in \['held_out_of_train_split'\]"):
    run._check_or_write_config()


def test_a_written_pair_longer_than_the_context_is_rejected_not_trained_on(tiny_chat_model, tmp_path):
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  run = experiment.Experiment(config, str(tmp_path))
  ex = run.examples[0]
  short = synthesis.Pair("Please find it.", "[f(a=1)]")
  long = synthesis.Pair("Please " * run.model_config.context_length, "[f(a=1)]")
  assert run._within_context(ex, short) == short
  assert run._within_context(ex, long).rejected == "the pair is longer than the model's context"
  rejected = synthesis.Pair("x", "y", rejected="unparseable")
  assert run._within_context(ex, rejected) == rejected


def test_icl_shows_the_training_splits_nearest_gold_calls_that_fit(tiny_chat_model, tmp_path, monkeypatch):
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  config.variants = "base,ttsi_icl,icl"
  config.uncertainty.tau = 1.01  # every input flagged
  config.decoding.modes = "direct"
  config.task.num_examples, config.wave_size = 2, 2
  config.decoding.well_formed, config.decoding.max_new_tokens = False, 8  # fewer programs
  config.synthesis.validate = False
  config.sft.categories, config.sft.num_examples = "simple_python,live_simple", 3
  prompts = []  # the prompts each prefill saw
  monkeypatch.setattr(
      experiment.Experiment,
      "_icl_prompt",
      lambda self, ex, turns, real=experiment.Experiment._icl_prompt: prompts.append((ex.id, turns))
      or real(self, ex, turns),
  )
  workdir = str(tmp_path / "run")
  metrics = experiment.run(config, workdir)
  run = experiment.Experiment(config, str(tmp_path / "other"))
  pool = {ex.id: (task, ex) for task, ex in run.train_split}
  assert len(pool) == 6
  lines = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  for r, ex in zip(lines, run.examples):
    icl = r["variants"]["icl"]
    # One demonstration (synthesis.k): the most similar gold call of the split, shown as its
    # functions and request, then its gold call.
    nearest = run.train_split[run.retriever.ranked(ex)[0]][1]
    assert icl["adapted"] and icl["demonstrations"] == [nearest.id]
    task = pool[nearest.id][0]
    assert (ex.id, task.demonstration(nearest, task.gold_answer(nearest))) in prompts
    # ttsi_icl shows the input's own kept pairs, without a function list, and names no ids.
    assert "demonstrations" not in r["variants"]["ttsi_icl"]
  assert metrics["adapted_inputs"]["icl"] == 2
  # Where the nearest does not fit in the context with the prompt and the reserve, the next one
  # that does is shown; where none fits, the input is answered as base, saying why.
  ex = run.examples[0]
  ranked = run.retriever.ranked(ex)
  alone = len(run._icl_prompt(ex, []))
  added = [len(run._icl_prompt(ex, run._demonstration(i)[0])) - alone for i in ranked]
  assert all(run._demonstration(i)[1] <= a for i, a in zip(ranked, added))  # the quick bound
  assert min(added) < added[0]  # with this split: the nearest is not the shortest
  fit = lambda room: dataclasses.replace(run.model_config, max_position_embeddings=room + config.reserve)
  none = {"self": [None], "teacher": [None]}
  run.model_config = fit(alone + added[0])  # just room for the nearest
  assert run.in_context([ex], np.array([True]), none)[("icl", 0)].ids == [nearest_of(run, ex)]
  run.model_config = fit(alone + added[0] - 1)  # one token short: the next most similar that fits
  fits = next(i for i, a in zip(ranked, added) if a < added[0])
  # ttsi_icl's pairs obey the same rule: a pair too long for the room gives way to the next.
  long_pair, pair = synthesis.Pair("Please " * 2 * added[0], "[f(a=1)]"), synthesis.Pair(
      "Please f.", "[f(a=2)]"
  )
  written = {"self": [synthesis.Written([long_pair, pair])], "teacher": [None]}
  shown = run.in_context([ex], np.array([True]), written)
  assert shown[("icl", 0)].ids == [run.train_split[fits][1].id]
  assert shown[("ttsi_icl", 0)] == experiment.InContext(
      [{"role": "user", "content": "Please f."}, {"role": "assistant", "content": "[f(a=2)]"}], None
  )
  run.model_config = fit(alone)
  assert run.in_context([ex], np.array([True]), written) == {}
  # A row with earlier turns: the examples come after its system messages, before its conversation.
  conversation = [
      {"role": "system", "content": "s"},
      {"role": "user", "content": "u1"},
      {"role": "assistant", "content": "a1"},
      {"role": "user", "content": "u2"},
  ]
  monkeypatch.setattr(run.task, "prompt", lambda example: conversation)
  chats = []
  monkeypatch.setattr(run.tokenizer, "encode_chat", lambda messages: chats.append(messages) or [0])
  shown_turns = [{"role": "user", "content": "d"}, {"role": "assistant", "content": "[d()]"}]
  run._icl_prompt(ex, shown_turns)
  assert chats == [conversation[:1] + shown_turns + conversation[1:]]


def nearest_of(run, ex):
  return run.train_split[run.retriever.ranked(ex)[0]][1].id


@pytest.mark.parametrize("well_formed", [True, False])
def test_single_function_inputs_score_distinct_sampled_answers(
    tiny_chat_model, tmp_path, monkeypatch, well_formed
):
  config = tiny.get_config()
  config.model.path = tiny_chat_model
  config.task.category = "simple_python"
  config.task.num_examples = 2
  config.variants = "base"
  config.decoding.modes = "direct"
  config.decoding.well_formed = well_formed
  config.decoding.max_new_tokens = 16
  config.uncertainty.sampled_candidates = 3
  scored = []  # the token lists of each scoring by the answerer (not the call decoder's)
  scoring = answering.scoring
  recording = lambda sampler, pre, candidates, *a, **k: scored.append(candidates) or scoring.score_after(
      sampler, pre, candidates, *a, **k
  )
  monkeypatch.setattr(
      answering, "scoring", types.SimpleNamespace(**{**vars(scoring), "score_after": recording})
  )
  experiment.run(config, str(tmp_path))
  task = BfclTask("simple_python", 2)
  tokenizer = tokenizer_lib.load(tiny_chat_model)
  for row, line in enumerate(open(tmp_path / "results.jsonl")):
    r = json.loads(line)
    candidates = r["candidates"]
    # Each sampled answer is scored whole: its tokens, then the end of its turn (H's second
    # scoring, after the function names').
    assert scored[1][row] == [tokenizer.encode(c) + [tokenizer.end_of_turn_id] for c in candidates]
    assert 1 <= len(candidates) <= 3 and len(r["probs"]) == len(candidates)
    assert len(answering.distinct_answers(task, candidates)) == len(candidates)  # distinct
    if well_formed:
      assert all(c.endswith(")]") for c in candidates)  # full calls, not "[name(" prefixes
    else:  # the random model's free answers are distinct garbage, each scored (no fallback)
      assert len(candidates) == 3 and task.canonical(candidates[0]) is None
    if len(candidates) == 1:
      assert r["margin"] == 1.0
    else:
      np.testing.assert_allclose(r["margin"], sorted(r["probs"])[-1] - sorted(r["probs"])[-2], atol=1e-6)


def test_distinct_answers_merge_equal_calls_and_keep_unparseable_text():
  task = BfclTask("simple_python", 1)
  answers = ["[f(a=1)]", "[f(a = 1)]", "I would call f.", "I would call f. ", "", "[f(a=2)]"]
  assert answering.distinct_answers(task, answers) == ["[f(a=1)]", "I would call f.", "[f(a=2)]"]


def test_answers_that_make_no_call_vote_as_one_answer():
  """Prose makes no call: right where the answer is no call (BFCL's irrelevance rule), so it must
  vote, not leave the vote to a lone call or judge all-prose samples wrong."""
  vote = lambda task, ex, samples: answering.verdicts(
      task, ex, {"direct": "", "samples": samples}, ("majority",)
  )
  task = BfclTask("irrelevance", 1)
  (ex,) = task.examples()
  call = f"[{ex.functions[0]['name']}()]"
  assert vote(task, ex, ["No tool fits.", "I cannot help.", call])["majority"]
  assert vote(task, ex, ["No tool fits.", "I cannot help."])["majority"]
  assert not vote(task, ex, ["No tool fits.", call, call])["majority"]
  task = BfclTask("multiple", 1)
  (ex,) = task.examples()
  right = task.gold_answer(ex)
  assert not vote(task, ex, ["I would call it.", "Let me think.", right])["majority"]
  assert vote(task, ex, ["Let me think.", right, right])["majority"]
  assert not vote(task, ex, [])["majority"]


def test_flag_metrics_use_the_direct_verdict_even_when_only_voting_is_reported():
  task = BfclTask("multiple", 1)
  ex = task.examples()[0]
  right, wrong = task.gold_answer(ex), "[nothing()]"
  verdicts = answering.verdicts(task, ex, {"direct": right, "samples": [wrong, wrong]}, ("majority",))
  assert verdicts == {"direct": True, "majority": False}
  record = records.Record(
      0,
      ex.id,
      0.5,
      0.7,
      ["f", "g"],
      [0.75, 0.25],
      [1.0, 2.0],
      True,
      records.BaseAnswer(right, verdicts, ""),
      [],
      {},
  )
  metrics = experiment.compute_metrics([record], ("base",), ("majority",), [("line 7", "invalid JSON")])
  assert metrics["accuracy"] == {"base/majority": 0.0}
  # Flagged but right: precision 0; no wrong answer to catch: recall undefined (None), not 0.
  assert metrics["base_wrong"] == 0 and metrics["flag_precision"] == 0.0
  assert metrics["flag_recall_of_wrong"] is None
  assert "(recall n/a, precision 0.0%)" in experiment.format_summary(metrics)
  assert metrics["skipped_rows"] == [["line 7", "invalid JSON"]]  # the task's skipped rows, counted


def test_a_workdir_resumes_under_changes_that_keep_results_and_refuses_others(tmp_path):
  class Run(experiment.Experiment):  # what the check reads, without a task or a model
    data_version, model_version = "bfcl-eval 4.0.1", "0123456789ab"

    def __init__(self):
      self.config, self.workdir, self.held_out = tiny.get_config(), str(tmp_path), []

  check = experiment.Experiment._check_or_write_config
  run = Run()
  check(run)
  run.config.wave_size = 3
  check(run)  # no results yet: the new config replaces the old
  (tmp_path / "results.jsonl").write_text('{"wave": 0}\n')
  run.config.adaptation.adapters_per_call = 1
  run.config.adaptation.remat = "on"
  run.config.mesh_shape = ()
  run.config.keep_adapters = "all"
  run.config.sampling.max_new_tokens = 7
  check(run)  # the results stay the same
  run.config.sft.num_examples = 0  # sections of variants that this run does not run (no sft, no ttd)
  run.config.teacher.model = "another"
  check(run)
  run.data_version = "bfcl-eval 4.0.2"  # the same config and ids, other data or checker
  with pytest.raises(ValueError, match=r"differs in \['data_version'\]"):
    check(run)
  run.data_version = "bfcl-eval 4.0.1"
  run.model_version = "ba9876543210"  # other weights at the same model.path
  with pytest.raises(ValueError, match=r"differs in \['model_version'\]"):
    check(run)
  run.model_version = "0123456789ab"
  run.config.adaptation.learning_rate = 1.0
  run.config.wave_size = 4
  with pytest.raises(ValueError, match=r"differs in \['adaptation.learning_rate', 'wave_size'\]"):
    check(run)
  run.config.variants += ",sft"  # now the sft section acts
  run.config.sft.num_examples = 5
  with pytest.raises(
      ValueError, match=r"differs in \['adaptation.learning_rate', 'sft.num_examples', 'variants'"
  ):
    check(run)
  run.config.variants = tiny.get_config().variants
  # A workdir written before a config field existed resumes with that field's default.
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["teacher"]["request_json"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  run.config = tiny.get_config()
  run.config.wave_size = 3
  check(run)
  assert not (tmp_path / "config.json.tmp").exists()
  # Results an earlier ttsi_jax computed otherwise (a config.json without method_version: 1) are
  # not continued under the current method.
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["method_version"] == config_schema.METHOD_VERSION > 1
  del saved["method_version"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r"an earlier ttsi_jax computed differently \(method version 1, now "):
    check(run)
  # Results without their config cannot be checked: refused, as is a config that is not JSON.
  (tmp_path / "config.json").write_text('{"seed": ')
  with pytest.raises(ValueError, match=r"config.json is not the JSON config a run writes"):
    check(run)
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"config.json holds a JSON list, not the config a run writes"):
    check(run)
  (tmp_path / "config.json").unlink()
  with pytest.raises(ValueError, match=r"holds results.jsonl but no config.json"):
    check(run)


def test_kept_ids_that_trained_no_adapter_are_named():
  kept = [{"id": "multiple_2", "variants": ["ttsi"]}]
  ids = ["multiple_0", "multiple_1", "multiple_2"]
  assert experiment.kept_without_adapter(("multiple_1", "multiple_2", "multiple_7"), ids, kept) == [
      "multiple_1"
  ]
  assert experiment.kept_without_adapter("all", ids, kept) == []  # "all": whatever trained


def test_a_workdir_in_use_by_another_run_is_refused_naming_it(tmp_path):
  held = experiment.lock_workdir(str(tmp_path))
  with pytest.raises(ValueError, match=rf"{tmp_path} is in use by a run on .*, pid {os.getpid()}: wait"):
    experiment.lock_workdir(str(tmp_path))  # a relaunch while the first run goes on
  held.close()  # the run ended (or died: the system drops its lock)
  experiment.lock_workdir(str(tmp_path)).close()


def _line(wave, input_id):
  """A results record of input_id in wave, as a line of results.jsonl."""
  base = records.BaseAnswer("[f()]", {"direct": True}, "")
  return records.Record(wave, input_id, 0.5, 0.5, ["[f("], [1.0], [1.0], False, base, [], {}).to_json() + "\n"


def _waves_file(path, waves_ids, tail=""):
  path.write_text("".join(_line(w, i) for w, ids in enumerate(waves_ids) for i in ids) + tail)


def test_resume_drops_only_a_cut_last_wave_and_refuses_changed_data(tmp_path):
  from ttsi_jax.tasks.base import Example

  waves = [[Example(i, "q", ()) for i in ids] for ids in (["a", "b"], ["c", "d"], ["e"])]
  path = tmp_path / "results.jsonl"
  _waves_file(path, [["a", "b"], ["c"]], tail='{"wave": 1, "id": "d", "ans')
  assert experiment._finished_waves(str(path), waves) == 1
  assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]
  _waves_file(path, [["a", "b"], ["c"]])
  with open(path, "ab") as f:
    f.write(b'{"wave": 1, "id": "d", "\xff\xfe\x00')  # cut inside a write: any bytes
  assert experiment._finished_waves(str(path), waves) == 1
  assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]
  # A whole last record without its newline is kept, and given one, so the next does not join it.
  _waves_file(path, [["a", "b"], ["c"]], tail=_line(1, "d").rstrip("\n"))
  assert experiment._finished_waves(str(path), waves) == 2
  assert path.read_text().endswith(_line(1, "d"))
  assert [r.id for r in records.read(str(path))] == ["a", "b", "c", "d"]
  _waves_file(path, [["a", "b"], ["c", "x"]])  # finished work for other inputs: never dropped
  with pytest.raises(
      ValueError,
      match=r"wave 1 holds inputs \['c', 'x'\] but this run's data "
      r"puts \['c', 'd'\] there.*new --workdir",
  ):
    experiment._finished_waves(str(path), waves)
  assert len(path.read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "line",
    [
        '{"wave": 0, "id": "b", "ans\n',
        '{"id": "b"}\n',
        "[1, 2]\n",
        '{"wave": 0, "id": "b"}\n',  # no record: the metrics could not read it
        _line(0, "b").replace(f'"format": {records.FORMAT}', '"format": 9'),  # a newer format
    ],
)
def test_resume_stops_at_a_bad_line_before_the_end_naming_it(tmp_path, line):
  from ttsi_jax.tasks.base import Example

  waves = [[Example(i, "q", ()) for i in ids] for ids in (["a", "b"], ["c", "d"])]
  path = tmp_path / "results.jsonl"
  _waves_file(
      path,
      [["a"]],
      tail=line + _line(1, "c") + _line(1, "d"),
  )
  before = path.read_text()
  with pytest.raises(ValueError, match=r"results.jsonl, line 2: not a results record .*new " r"--workdir"):
    experiment._finished_waves(str(path), waves)
  assert path.read_text() == before  # the finished waves after it are kept


@pytest.mark.parametrize("temperature, p_first", [(1.0, 0.7), (0.5, 0.49 / 0.58)])
def test_sampled_answers_draw_their_function_from_the_rss_probabilities(temperature, p_first):
  from ttsi_jax.tasks.base import Example

  three = Example("m", "q", ({"name": "a"}, {"name": "b"}, {"name": "c"}))
  one = Example("s", "q", ({"name": "only"},))
  examples = [three] * 2000 + [one]
  probs = [np.array([0.7, 0.3, 0.0])] * 2000 + [np.array([0.2, 0.8])]
  stats = uncertainty.CandidateStats([], probs, [], np.zeros(2001), np.zeros(2001), np.zeros(2001, int))
  answerer = types.SimpleNamespace(temperature=temperature)
  drawn = answering.Answerer.draw_functions(
      answerer, examples, stats, jax.random.split(jax.random.key(0), len(examples))
  )
  assert set(drawn[:-1]) == {0, 1} and drawn[-1] == 0  # never a zero-probability function
  assert abs(np.mean(drawn[:-1] == 0) - p_first) < 0.04
  greedy = types.SimpleNamespace(temperature=0.0)
  stats.best_B = np.arange(len(examples)) % 2
  keys = jax.random.split(jax.random.key(1), len(examples))
  np.testing.assert_array_equal(
      answering.Answerer.draw_functions(greedy, examples, stats, keys), stats.best_B
  )
