import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_echo import BadRecordError, Role, Rollout
from lit_echo.data.records import parse_record


def _rollout(**kw):
    base = dict(input_ids=[5, 6, 7, 8], roles=[0, 1, 2, 3], logprobs=[None, -0.1 - 0.2, None, None], reward=0.5,
                group_id="g-ü", advantage=-1.25, policy_version=3, metadata={"task": "日本語", "turns": [1, 2]})
    base.update(kw)
    return Rollout(**base)


def test_role_values():
    assert [int(r) for r in Role] == [0, 1, 2, 3]
    assert Role(2) is Role.OBSERVATION and Role.WARNING.name == "WARNING"


def test_jsonl_round_trip_is_exact():
    r = _rollout()
    line = r.to_json()
    assert "\n" not in line
    back = Rollout.from_json(line)
    assert back == r
    assert back.logprobs[1] == -0.1 - 0.2  # float repr round-trips bit for bit
    assert back.to_json() == line


def test_round_trip_through_parse_record_without_tokenizer():
    r = _rollout(logprobs=None, advantage=None)
    assert parse_record(r.to_json().encode()) == r


@pytest.mark.parametrize("record, field", [
    ({"input_ids": [], "roles": []}, "input_ids"),
    ({"input_ids": [1, -2], "roles": [0, 1]}, "input_ids"),
    ({"input_ids": [1, 2], "roles": [0, 4]}, "roles"),
    ({"input_ids": [1, 2], "roles": [0]}, "roles"),
    ({"input_ids": [1, 2], "roles": [0, 1], "logprobs": [0.5, None]}, "logprobs"),
    ({"input_ids": [1, 2], "roles": [0, 1], "logprobs": [None]}, "logprobs"),
    ({"input_ids": [1, 2], "roles": [0, 1], "reward": "high"}, "reward"),
    ({"input_ids": [1, 2], "roles": [0, 1], "group_id": [1]}, "group_id"),
    ({"input_ids": [1, 2], "roles": [0, 1], "advantage": "x"}, "advantage"),
    ({"input_ids": [1, 2], "roles": [0, 1], "metadata": []}, "metadata"),
    ({"roles": [0, 1]}, "<record>"),
    ({"input_ids": [1, 2]}, "roles"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "warning": "w"}]}, "messages[0].warning"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages"),
])
def test_bad_records_name_the_field_and_expected_form(record, field):
    with pytest.raises(BadRecordError) as info:
        parse_record(json.dumps(record))
    assert info.value.field == field
    assert "expected" in str(info.value) and info.value.expected


def test_not_json_and_not_utf8():
    with pytest.raises(BadRecordError, match="one JSON object per line"):
        parse_record(b'{"input_ids": [1,')
    with pytest.raises(BadRecordError, match="UTF-8"):
        parse_record(b'{"input_ids": [1], "roles": [0], "metadata": {"x": "\xff"}}')
    with pytest.raises(BadRecordError, match="JSON object"):
        parse_record("[1, 2, 3]")
    with pytest.raises(BadRecordError):
        parse_record('{"input_ids": [1, 2], "roles": [0, 1], "reward": NaN}')


def test_error_location():
    err = BadRecordError("roles", "a list").located("buf.jsonl", 7)
    assert str(err).startswith("buf.jsonl:7: field 'roles': expected a list")


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)
_fields = st.sampled_from(["input_ids", "roles", "logprobs", "reward", "group_id", "advantage", "policy_version",
                           "metadata", "messages"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=80),
    st.text(max_size=80),
    _json.map(json.dumps),
    st.dictionaries(_fields, _json, max_size=6).map(json.dumps),
    st.dictionaries(_fields, st.lists(st.integers(-3, 5), max_size=5), max_size=4).map(json.dumps),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                                    "content": st.one_of(st.text(max_size=20), st.integers())}),
             max_size=4).map(lambda m: json.dumps({"messages": m, "reward": 1.0})),
))
def test_malformed_lines_only_raise_the_documented_error(tiny_tokenizer, line):
    try:
        rollout = parse_record(line, tiny_tokenizer)
    except BadRecordError as err:
        assert err.field and err.expected
    else:
        assert len(rollout.input_ids) == len(rollout.roles) > 0
        assert math.isfinite(rollout.reward)
