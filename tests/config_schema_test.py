"""The config schema: bad values refused by name at start; stage configs built by field name."""

import dataclasses

import pytest

from configs import default, paper, tiny
from ttsi_jax import config_schema
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.ttsi import adaptation, synthesis


@pytest.mark.parametrize("config", [default.get_config(), paper.get_config(), tiny.get_config()])
def test_the_shipped_configs_are_valid(config):
  config_schema.validate(config)


@pytest.mark.parametrize(
    "field,value,valid",
    [
        ("task.num_examples", -1, "an integer >= 0 (0 = all)"),
        ("decoding.temperature", -0.5, "a number >= 0 (0 = greedy)"),
        ("synthesis.temperature", -1.0, "a number >= 0"),
        ("teacher.retries", -1, "an integer >= 0"),
        ("adaptation.learning_rate", 0.0, "a number > 0"),
        ("sft.learning_rate", -1e-4, "a number > 0"),
        ("decoding.max_args", 0, "an integer >= 1"),
        ("decoding.max_value_tokens", 0, "an integer >= 1"),
        ("model.dtype", "float64", "one of ['float32', 'bfloat16', 'float16']"),
        ("model.attention", "flash", "one of ['auto', 'xla', 'cudnn']"),
        ("decoding.top_p", 1.5, "a number in (0, 1]"),
        ("adaptation.dropout", 1.0, "a number in [0, 1)"),
        ("wave_size", True, "an integer >= 1"),
        ("uncertainty.measure", "variance", "one of ['margin', 'entropy']"),
        ("seed", 2**32, "an integer in [0, 2147483647] (jax.random.key wraps larger seeds)"),
    ],
)
def test_each_bad_value_is_refused_by_name_with_its_valid_range(field, value, valid):
  config = default.get_config()
  section, _, name = field.rpartition(".")
  setattr(config[section] if section else config, name, value)
  with pytest.raises(ValueError) as error:
    config_schema.validate(config)
  assert f"{field}={value!r} (valid: {valid}" in str(error.value)


def test_sampled_candidates_need_a_sampling_temperature():
  config = default.get_config()
  config.decoding.temperature = 0.0  # every sampled call would be the greedy one: never flagged
  with pytest.raises(ValueError, match=r"uncertainty.sampled_candidates=5 with decoding.temperature=0 "):
    config_schema.validate(config)
  config.uncertainty.sampled_candidates = 0
  config_schema.validate(config)


def test_every_bad_field_is_named_at_once():
  config = default.get_config()
  config.wave_size, config.teacher.retries = 0, -2
  with pytest.raises(ValueError, match=r"wave_size=0 .*; teacher.retries=-2 "):
    config_schema.validate(config)


@pytest.mark.parametrize(
    "cls,section", [(adaptation.AdaptConfig, "adaptation"), (synthesis.SynthesisConfig, "synthesis")]
)
def test_stage_defaults_are_the_default_configs(cls, section):
  built = config_schema.build(
      cls,
      default.get_config()[section],
      **({"targets": lora_lib.ALL_LINEAR} if section == "adaptation" else {}),
  )
  assert built == cls()


def test_stage_configs_are_built_by_field_name_not_position():
  section = default.get_config().adaptation
  section.epochs, section.batch_size, section.rank = 7, 3, 16
  built = config_schema.build(adaptation.AdaptConfig, section, targets=("q_proj",))
  assert (built.epochs, built.batch_size, built.rank, built.targets) == (7, 3, 16, ("q_proj",))
  # Every field of the stage config comes from the section (none left at a dataclass default).
  assert {f.name for f in dataclasses.fields(adaptation.AdaptConfig)} <= set(section) | {"targets"}


@pytest.mark.parametrize("variants", ["base,sft", ["base", "sft"]])
def test_a_variants_own_section_counts_only_where_a_config_runs_it(variants):
  before = {"variants": variants, "sft.num_examples": 32, "teacher.model": "a", "seed": 0}
  now = {**before, "sft.num_examples": 0, "teacher.model": "b"}
  assert config_schema.result_changing_differences(before, now) == ["sft.num_examples"]  # no ttd
  without = {"variants": "base,ttsi"}
  assert config_schema.result_changing_differences({**before, **without}, {**now, **without}) == []


def test_the_training_split_counts_for_icl_but_sfts_training_settings_do_not():
  before = {"variants": "base,icl", "sft.categories": "live_simple", "sft.learning_rate": 1e-4}
  now = {**before, "sft.categories": "simple_python", "sft.learning_rate": 1e-3}
  # icl shows the split's gold calls; it trains nothing, so sft's training settings are neutral.
  assert config_schema.result_changing_differences(before, now) == ["sft.categories"]
  both = {"variants": "base,icl,sft"}
  assert config_schema.result_changing_differences({**before, **both}, {**now, **both}) == [
      "sft.categories",
      "sft.learning_rate",
  ]


def test_a_run_of_an_earlier_version_counts_as_this_one_only_where_no_later_change_touches_it():
  # Free-text decoding everywhere: untouched by version 7 (well-formed decoding's values).
  free = {"decoding": {"modes": "direct", "well_formed": False}, "synthesis": {"well_formed": False}}
  direct = {"method_version": 3, **free}
  voting = {"method_version": 3, **free, "decoding": {"modes": "direct,majority", "well_formed": False}}
  assert config_schema.run_fields(direct)["method_version"] == config_schema.METHOD_VERSION == 7
  assert config_schema.run_fields(voting)["method_version"] == 3  # its majority verdicts differ
  assert config_schema.run_fields({"decoding": {"modes": "direct"}})["method_version"] == 1
  assert config_schema.run_fields({**direct, "method_version": 2})["method_version"] == 2
  newer = config_schema.METHOD_VERSION + 1  # a later checkout's records: not this code's method
  assert config_schema.run_fields({**direct, "method_version": newer})["method_version"] == newer
  before, now = config_schema.run_fields(voting), config_schema.run_fields({**voting, "method_version": 7})
  assert config_schema.result_changing_differences(before, now) == ["method_version"]
  # Version 5 (G's function names tokenized after "Call:") touches the runs where another model
  # than the embedded default's writes pairs well-formed: self pairs, or a local teacher's for ttd.
  version = lambda **run: config_schema.run_fields({**direct, "method_version": 4, **run})["method_version"]
  own_model, formed = {"model": {"path": "/ckpt/llama2"}}, {"well_formed": True}
  assert version(**own_model, variants="base,ttsi", synthesis=formed) == 4
  assert version(**own_model, variants="base,ttsi") == 7
  assert version(**own_model, variants="base,oracle,sft,self_label,icl", synthesis=formed) == 7  # no G
  assert version(variants="base,ttsi") == 7  # the embedded default
  assert version(teacher={"kind": "local"}, variants="base,ttd", synthesis=formed) == 4
  assert version(teacher={"kind": "local"}, variants="base,ttd") == 7
  # Version 6 (LoRA dropout's masks per token) touches the runs that train with dropout.
  assert version(variants="base,ttsi", adaptation={"dropout": 0.1}) == 4
  assert version(variants="base,sft", adaptation={"dropout": 0.1}) == 4
  assert version(variants="base,ttsi_icl,icl", adaptation={"dropout": 0.1}) == 7  # nothing trains
  assert version(variants="base,ttsi", adaptation={"dropout": 0.0}) == 7
  # Version 7 (well-formed decoding's values) touches the runs that decode answers or G's pairs
  # well-formed: the default's (a field left out reads as the default, True).
  assert version(variants="base,ttsi", decoding={"modes": "direct"}) == 4
  assert version(variants="base,ttsi", synthesis=formed) == 4
  assert version(variants="base,oracle,sft,self_label,icl", synthesis=formed) == 7  # G writes nothing
  assert version(teacher={"kind": "endpoint"}, variants="base,ttd", synthesis=formed) == 7  # nor here


def test_a_stage_field_missing_from_the_config_is_refused_by_name():
  """Left to a dataclass default it would act unrecorded: a resume could not see it change."""
  section = default.get_config().synthesis
  del section["temperature"]
  with pytest.raises(ValueError, match=r"no \['temperature'\] for SynthesisConfig.*configs/default.py"):
    config_schema.build(synthesis.SynthesisConfig, section)
  config = default.get_config()
  config_schema.build(synthesis.EndpointConfig, config.teacher)  # the shipped sections are whole


def test_a_datasets_fields_without_task_name_tfds_are_refused_and_other_kinds_fields_are_neutral():
  config = default.get_config()
  config.task.dataset, config.task.manual_dir = "nexusraven", "/data/nr"  # task.name=tfds forgotten
  with pytest.raises(
      ValueError, match=r"task.dataset='nexusraven' with task.name='bfcl' .*task.name=tfds.*task.manual_dir="
  ):
    config_schema.validate(config)
  config.task.name = "tfds"
  config_schema.validate(config)
  bfcl_run = config_schema.flat(default.get_config().to_dict())
  before = {**bfcl_run, "task.dataset": "user_tools"}  # a config.json of an older default
  assert config_schema.result_changing_differences(before, bfcl_run) == []
  tfds_run = {**bfcl_run, "task.name": "tfds", "task.dataset": "user_tools"}
  assert (
      config_schema.result_changing_differences(tfds_run, {**tfds_run, "task.category": "simple_python"})
      == []
  )
  assert config_schema.result_changing_differences(tfds_run, {**tfds_run, "task.dataset": "nexusraven"}) == [
      "task.dataset"
  ]


def test_a_reserve_smaller_than_what_the_stages_decode_is_refused():
  config = default.get_config()
  config.reserve = 90  # a request of 48 tokens after "Request: ..." takes a bucket of 64, + 32
  config.variants = "base,sft"
  config_schema.validate(config)  # no variant writes pairs
  for variants, teacher in (("base,ttsi", ""), ("base,ttd", "local")):  # the model, or a local teacher
    config.variants, config.teacher.kind = variants, teacher
    with pytest.raises(
        ValueError, match=r"reserve=90 \(valid: at least 96, the request of synthesis.max_request"
    ):
      config_schema.validate(config)
  config.teacher.kind = "endpoint"  # its pairs come from the endpoint
  config_schema.validate(config)
  config.variants, config.synthesis.well_formed = "base,ttsi", False
  config_schema.validate(config)  # free synthesis prefills its own room
  config.decoding.well_formed = False
  with pytest.raises(ValueError, match=r"reserve=90 \(valid: at least 96, decoding.max_new_tokens"):
    config_schema.validate(config)
  # The request's bucket is the run's: 40 + 8 tokens take 48 slots, 64 in powers of two only.
  config.decoding.well_formed, config.synthesis.well_formed = True, True
  config.synthesis.max_request_tokens = 40
  config_schema.validate(config)
  config.buckets_per_octave = 1
  with pytest.raises(ValueError, match=r"reserve=90 \(valid: at least 96, the request of synthesis"):
    config_schema.validate(config)


def test_voting_modes_need_a_sampling_temperature():
  config = default.get_config()
  config.decoding.modes, config.decoding.temperature = "direct,majority", 0.0
  config.uncertainty.sampled_candidates = 0  # its own rule (above)
  with pytest.raises(ValueError, match=r"decoding.modes='direct,majority' with decoding.temperature=0"):
    config_schema.validate(config)
  for modes in ("direct", "direct,", " direct"):  # as the run reads them
    config.decoding.modes = modes
    config_schema.validate(config)
