"""A results.jsonl line reads back as the record that wrote it; optional fields stay out."""

import json

import pytest

from ttsi_jax.ttsi import records
from ttsi_jax.ttsi.synthesis import Pair


def _record(**changes):
  fields = dict(
      wave=1,
      id="multiple_3",
      margin=0.25,
      entropy=0.6,
      candidates=["[f(", "[g("],
      probs=[0.625, 0.375],
      perplexity=[1.5, 2.5],
      uncertain=True,
      base=records.BaseAnswer("[g(x=1)]", {"direct": False}, "wrong function"),
      pairs=[Pair("ask f", "[f(x=2)]"), Pair("```python", "[f(", "unparseable")],
      variants={
          "ttsi": records.VariantAnswer(True, "[f(x=1)]", {"direct": True}, "", losses=[2.0, 1.5]),
          "ttd": records.VariantAnswer(
              False, "[g(x=1)]", {"direct": False}, "wrong function", reason="teacher failed"
          ),
      },
      teacher_pairs=records.TEACHER_FAILED,
      wave_seconds={"H": 1.0},
      host=1,
  )
  return records.Record(**{**fields, **changes})


def test_a_line_reads_back_as_the_record_that_wrote_it():
  record = _record()
  line = record.to_json()
  assert records.Record.from_json(line) == record
  d = json.loads(line)
  assert d["variants"]["ttd"] == {
      "adapted": False,
      "answer": "[g(x=1)]",
      "correct": {"direct": False},
      "error": "wrong function",
      "reason": "teacher failed",
  }  # no losses: it trained nothing
  assert "reason" not in d["variants"]["ttsi"] and d["variants"]["ttsi"]["losses"] == [2.0, 1.5]
  assert "samples" not in d["base"] and d["teacher_pairs"] == "failed"
  assert d["pairs"][1] == {"request": "```python", "call": "[f(", "rejected": "unparseable"}


def test_what_closed_a_call_is_kept_on_its_answer_and_pair_and_left_out_where_nothing_did():
  cut = "decoding.max_args (1)"
  record = _record(
      base=records.BaseAnswer("[g(x=1)]", {"direct": False}, "missing y", closed=cut),
      pairs=[Pair("ask f", "[f(x=2)]", closed=cut), Pair("ask g", "[g(x=3)]")],
  )
  record.variants["ttsi"].closed = cut
  d = json.loads(record.to_json())
  assert d["base"]["closed"] == d["variants"]["ttsi"]["closed"] == d["pairs"][0]["closed"] == cut
  assert "closed" not in d["variants"]["ttd"] and "closed" not in d["pairs"][1]
  assert records.Record.from_dict(d) == record


def test_teacher_pairs_are_a_list_of_pairs_or_absent():
  with_pairs = _record(teacher_pairs=[Pair("ask g", "[g(x=3)]")])
  assert records.Record.from_json(with_pairs.to_json()).teacher_pairs == [Pair("ask g", "[g(x=3)]")]
  without = json.loads(_record(teacher_pairs=None).to_json())
  assert "teacher_pairs" not in without
  assert records.Record.from_dict(without).teacher_pairs is None


def test_a_line_missing_fields_names_them():
  d = json.loads(_record().to_json())
  del d["margin"], d["base"]
  with pytest.raises(ValueError, match=r"needs the fields \['margin', 'base'\]"):
    records.Record.from_dict(d)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"wave": "0"}, r"wave is an integer and its id a string, not '0'"),
        ({"id": 3}, r"wave is an integer and its id a string, not 1, 3"),
        ({"variants": []}, r"fields do not fit its format"),
        ({"base": {"answer": "[f()]", "shade": 1}}, r"fields do not fit its format.*'shade'"),
        ({"teacher_pairs": "fail"}, r"teacher_pairs is a list, 'failed' or absent, not 'fail'"),
    ],
)
def test_a_line_of_other_types_is_refused_by_name(change, message):
  with pytest.raises(ValueError, match=message):
    records.Record.from_dict({**json.loads(_record().to_json()), **change})


def test_lines_carry_their_format_and_a_newer_one_is_refused():
  d = json.loads(_record().to_json())
  assert d["format"] == records.FORMAT
  del d["format"]  # written before the format was versioned: format 1, all else as written
  assert records.Record.from_dict(d) == _record(format=1)
  with pytest.raises(ValueError, match=r"format 99, newer than this ttsi_jax reads"):
    records.Record.from_dict({**d, "format": 99})


def test_reading_a_file_names_the_bad_line(tmp_path):
  path = tmp_path / "results.jsonl"
  d = json.loads(_record().to_json())
  path.write_text(json.dumps(d) + "\n" + json.dumps({**d, "format": records.FORMAT + 1}) + "\n")
  with pytest.raises(
      ValueError, match=rf"results.jsonl, line 2: a results record of format {records.FORMAT + 1}"
  ):
    records.read(str(path))
  path.write_text(json.dumps(d) + "\n")
  assert records.read(str(path)) == [_record()]
