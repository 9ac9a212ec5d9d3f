"""Reader fuzz suite: hostile lines and damaged files through the real RolloutBuffer (see fuzz_reader_cases).

Every rejection names ``file:line: field`` (or the file, for whole-file damage), skip mode never raises and keeps
every good record, and whatever is accepted collates into tensors training can use. The quick part runs by
default (hypothesis, a few hundred cases); the slow part runs 10,000 seeded cases
(``pytest -m slow tests/test_fuzz_reader.py -s`` prints the counts; scripts/fuzz_report.py prints the table).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fuzz_reader_cases import check_case, damaged_file, line_case, run
from hypothesis import given, settings
from hypothesis import strategies as st


def _chooser(data):
    return lambda options: data.draw(st.sampled_from(list(options)))


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_hostile_lines(tiny_tokenizer, data):
    with tempfile.TemporaryDirectory() as directory:
        case = line_case(_chooser(data))
        assert check_case(Path(directory), case, tiny_tokenizer, line_case=True) is None, case


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_damaged_files(tiny_tokenizer, data):
    with tempfile.TemporaryDirectory() as directory:
        case = damaged_file(_chooser(data))
        assert check_case(Path(directory), case, tiny_tokenizer, line_case=False) is None, case


@pytest.mark.slow
def test_ten_thousand_seeded_cases(tiny_tokenizer, tmp_path):
    result = run(10_000, seed=0, directory=tmp_path, tokenizer=tiny_tokenizer)
    print({k: v for k, v in result.items() if k != "examples"})
    assert result["lines"]["tried"] + result["files"]["tried"] == 10_000
    assert result["lines"]["failed"] == result["files"]["failed"] == 0, result["examples"]
