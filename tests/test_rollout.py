import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_echo import BadRecordError, Role, Rollout
from lit_echo.data.records import parse_record


def _rollout(**kw):
    base = {"input_ids": [5, 6, 7, 8], "roles": [0, 1, 2, 3], "logprobs": [None, -0.1 - 0.2, None, None],
            "reward": 0.5, "group_id": "g-ü", "advantage": -1.25, "policy_version": 3,
            "metadata": {"task": "日本語", "turns": [1, 2]}}
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


@pytest.mark.parametrize("line, field", [
    ('{"input_ids": [1, 9223372036854775808], "roles": [0, 1]}', "input_ids"),  # 2**63: collator overflow
    ('{"input_ids": [1, 2], "roles": [0, 1], "policy_version": -9223372036854775809}', "policy_version"),
    ('{"input_ids": [1, 2], "roles": [0, 1], "advantage": 1e39}', "advantage"),  # float32 inf later
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": -3.5e38}', "reward"),
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": 1e200}', "reward"),
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": 1e400}', "reward"),  # parses as inf
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": Infinity}', "reward"),
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": 1' + "0" * 400 + "}", "reward"),  # isfinite overflow
    ('{"input_ids": [1, 2], "roles": [0, 1], "logprobs": [null, -1' + "0" * 400 + "]}", "logprobs"),
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": 1' + "0" * 5000 + "}", "<record>"),  # int parse limit
    ('{"input_ids": [1, 2], "roles": [0, 1], "tokenizer_fingerprint": 7}', "tokenizer_fingerprint"),
])
def test_values_training_cannot_use_are_rejected(line, field):
    with pytest.raises(BadRecordError) as info:
        parse_record(line)
    assert info.value.field == field and len(str(info.value)) < 400


def test_float32_range_and_a_bom_are_accepted():
    r = parse_record('\ufeff{"input_ids": [1, 9223372036854775807], "roles": [0, 1], "reward": 3e38, '
                     '"advantage": -3.4028234663852886e38, "logprobs": [null, -3e38], "policy_version": -1}')
    assert r.reward == 3e38 and r.input_ids[1] == 2**63 - 1


def test_tokenizer_checks(tiny_tokenizer, tiny_checkpoint):
    from lit_echo.chat import tokenizer_fingerprint
    from lit_echo.pretrained import load_tokenizer

    vocab = len(tiny_tokenizer)
    ok = Rollout(input_ids=[1, vocab - 1], roles=[0, 1], tokenizer_fingerprint=tokenizer_fingerprint(tiny_tokenizer))
    assert parse_record(ok.to_json(), tiny_tokenizer) == ok
    # The same tokenizer loaded from disk (another process would do this) has the same fingerprint.
    assert parse_record(ok.to_json(), load_tokenizer(str(tiny_checkpoint))) == ok
    with pytest.raises(BadRecordError, match=f"token ids below the tokenizer's vocabulary size {vocab}") as info:
        parse_record(Rollout(input_ids=[1, vocab], roles=[0, 1]).to_json(), tiny_tokenizer)
    assert info.value.field == "input_ids" and "at position 1" in str(info.value)
    parse_record(Rollout(input_ids=[1, vocab], roles=[0, 1]).to_json())  # no tokenizer: only int64 is known
    foreign = Rollout(input_ids=[1, 2], roles=[0, 1], tokenizer_fingerprint="49152-0123456789abcdef").to_json()
    with pytest.raises(BadRecordError, match="another tokenizer") as info:
        parse_record(foreign, tiny_tokenizer)
    assert info.value.field == "tokenizer_fingerprint"
    messages = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    with pytest.raises(BadRecordError, match="expected a tokenizer") as info:
        parse_record(messages)
    assert info.value.field == "messages"
