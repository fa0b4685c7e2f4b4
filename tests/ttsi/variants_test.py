"""The variant table and the planning of a wave's adapters, without a model."""

import numpy as np
import pytest

from ttsi_jax.ttsi import variants

FLAGS = np.array([True, False, True, False])  # inputs 0 and 2 uncertain


def _data(available):
  """data_for over {(source, input): examples}; records every call."""
  calls = []

  def data_for(source, i):
    calls.append((source, i))
    return available.get((source, i), [])

  return data_for, calls


def test_each_variant_targets_the_inputs_its_row_names():
  assert variants.targets("base", FLAGS).tolist() == [False] * 4
  for v in ("ttsi", "ttd", "ttsi_icl", "icl"):
    assert variants.targets(v, FLAGS).tolist() == FLAGS.tolist()
  assert variants.targets("certain_only", FLAGS).tolist() == (~FLAGS).tolist()
  for v in ("all_inputs", "oracle", "sft"):
    assert variants.targets(v, FLAGS).tolist() == [True] * 4


def test_variants_that_train_on_the_same_data_share_one_adapter():
  self_data = {("self", i): [f"pair {i}"] for i in range(4)}
  gold = {("gold", i): [f"gold {i}"] for i in range(4)}
  data_for, calls = _data({**self_data, **gold})
  plan = variants.plan_adapters(["base", "ttsi", "all_inputs", "certain_only", "oracle"], FLAGS, data_for)
  # One job per (source, input): 4 self-written, 4 gold; each input's data read once.
  assert [(job.source, job.input) for job in plan.jobs] == (
      [("self", 0), ("self", 2), ("self", 1), ("self", 3)] + [("gold", i) for i in range(4)]
  )
  assert sorted(calls) == sorted(set(calls)) and len(calls) == 8
  job = {key: (plan.jobs[j].source, plan.jobs[j].input) for key, j in plan.job_of.items()}
  assert job[("ttsi", 0)] == job[("all_inputs", 0)] == ("self", 0)
  assert job[("certain_only", 1)] == job[("all_inputs", 1)] == ("self", 1)
  assert job[("oracle", 0)] == ("gold", 0)
  # Untargeted inputs get no job: ttsi skips the certain ones, certain_only the flagged ones.
  assert ("ttsi", 1) not in plan.job_of and ("certain_only", 0) not in plan.job_of
  assert plan.jobs[plan.job_of[("ttsi", 2)]].data == ["pair 2"]


def test_inputs_without_training_data_get_no_adapter_and_say_why():
  # Input 0: no kept pairs; input 2: the teacher failed; both flagged.
  data_for, calls = _data({("self", 2): ["pair 2"], ("teacher", 0): ["teacher pair 0"]})
  plan = variants.plan_adapters(["ttsi", "ttd", "ttsi_icl", "icl", "sft"], FLAGS, data_for)
  assert sorted(plan.job_of) == [("ttd", 0), ("ttsi", 2)]  # ICL and sft train no per-input adapter
  assert ("train", 0) not in calls  # icl's demonstrations are no training data
  assert variants.not_adapted_reason("ttsi", True, set()) == "no kept pairs"
  assert variants.not_adapted_reason("ttd", True, {"teacher"}) == "teacher failed"
  assert variants.not_adapted_reason("ttd", False, {"teacher"}) == "not targeted"
  assert variants.not_adapted_reason("icl", True, set()) == "none fits the context"
  assert variants.not_adapted_reason("ttsi_icl", True, set(), had_pairs=True) == "none fits the context"
  assert variants.not_adapted_reason("ttsi_icl", True, set()) == "no kept pairs"
  # A failed teacher is the teacher's reason only.
  assert variants.not_adapted_reason("ttsi", True, {"teacher"}) == "no kept pairs"


def test_synthesis_is_asked_only_for_the_inputs_a_variant_needs():
  assert variants.inputs_needing("self", ["base", "ttsi"], FLAGS) == [0, 2]
  assert variants.inputs_needing("self", ["ttsi_icl", "certain_only"], FLAGS) == [0, 1, 2, 3]
  assert variants.inputs_needing("teacher", ["ttsi", "oracle"], FLAGS) == []
  assert variants.inputs_needing("teacher", ["ttd"], FLAGS) == [0, 2]


@pytest.mark.parametrize("name", variants.NAMES)
def test_every_row_of_the_table_is_complete(name):
  row = variants.TABLE[name]
  assert row.targets in ("none", "flagged", "certain", "all")
  assert row.source in variants.SOURCES + (None,)
  assert row.answers in ("base", "adapter", "icl", "sft")
  assert (row.answers in ("adapter", "icl")) == (row.source is not None) and row.doc
