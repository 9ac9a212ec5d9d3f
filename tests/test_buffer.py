import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from lit_echo import BadRecordError, Rollout
from lit_echo.data.buffer import (
    DamagedFileError,
    EmptyStreamError,
    RolloutBuffer,
    expand_paths,
)
from lit_echo.data.collate import RolloutCollator

REPO = Path(__file__).resolve().parents[1]


def _write_buffer(tmp_path, n_groups=23):
    """Tokenized records over two files (one gzip), groups of 1..4 rollouts, record id in metadata."""
    files = [tmp_path / "a.jsonl", tmp_path / "sub" / "b.jsonl.gz"]
    files[1].parent.mkdir()
    lines = [[], []]
    rid = 0
    for g in range(n_groups):
        for k in range(1 + g % 4):
            r = Rollout(input_ids=[1, 2, 3 + k], roles=[0, 1, 2], reward=float(k % 2), group_id=f"g{g}",
                        metadata={"id": rid})
            lines[g % 2].append(r.to_json())
            rid += 1
    files[0].write_text("\n".join(lines[0]) + "\n\n")  # a blank line is ignored
    with gzip.open(files[1], "wt") as fh:
        fh.write("\n".join(lines[1]) + "\n")
    return rid


def _ids(items):
    return [item.rollout.metadata["id"] for item in items]


def test_expand_paths(tmp_path):
    _write_buffer(tmp_path)
    assert [p.name for p in expand_paths(tmp_path)] == ["a.jsonl", "b.jsonl.gz"]
    assert [p.name for p in expand_paths(str(tmp_path / "*.jsonl"))] == ["a.jsonl"]
    with pytest.raises(FileNotFoundError, match="no rollout files"):
        expand_paths(tmp_path / "nothing-*.jsonl")


def test_one_pass_sees_every_record_once_and_shuffles_by_seed(tmp_path):
    n = _write_buffer(tmp_path)
    plain = _ids(RolloutBuffer(tmp_path, shuffle=False))
    assert sorted(plain) == list(range(n))
    a = _ids(RolloutBuffer(tmp_path, shuffle=True, shuffle_buffer=8, seed=1))
    b = _ids(RolloutBuffer(tmp_path, shuffle=True, shuffle_buffer=8, seed=1))
    c = _ids(RolloutBuffer(tmp_path, shuffle=True, shuffle_buffer=8, seed=2))
    assert a == b and sorted(a) == list(range(n)) and a != plain and a != c


def test_epochs_reshuffle_and_repeat(tmp_path):
    n = _write_buffer(tmp_path)
    buf = RolloutBuffer(tmp_path, shuffle=True, seed=0, repeat=True)
    it = iter(buf)
    first = [next(it).rollout.metadata["id"] for _ in range(n)]
    second = [next(it).rollout.metadata["id"] for _ in range(n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second


def test_worker_sharding_in_one_process(tmp_path):
    n = _write_buffer(tmp_path)
    seen = Counter()
    for index in range(4):
        seen.update(_ids(RolloutBuffer(tmp_path, shard=(index, 4))))
    assert seen == Counter(range(n))


def test_groups_stay_together_and_get_grpo_advantages(tmp_path):
    _write_buffer(tmp_path)
    by_group = {}
    for item in RolloutBuffer(tmp_path, shard=(1, 3)):
        by_group.setdefault(item.rollout.group_id, []).append(item.rollout)
    for group in by_group.values():
        size = 1 + int(group[0].group_id[1:]) % 4
        assert len(group) == size  # a shard owns whole groups
        rewards = [r.reward for r in group]
        if len(set(rewards)) == 1:
            assert all(r.advantage == 0.0 for r in group)
        else:
            assert sum(r.advantage for r in group) == pytest.approx(0.0, abs=1e-6)
            assert all((r.advantage > 0) == (r.reward == 1.0) for r in group)


SHARD_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.utils.data import DataLoader
    from lit_echo.data.buffer import RolloutBuffer

    def main(rank, path, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        dist.init_process_group("gloo", rank=rank, world_size=2)
        loader = DataLoader(RolloutBuffer(path, shuffle=True, seed=3), batch_size=None, num_workers=2)
        ids = [item.rollout.metadata["id"] for item in loader]
        with open(f"{out}/{rank}.json", "w") as fh:
            json.dump(ids, fh)
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.spawn(main, args=(sys.argv[1], sys.argv[2]), nprocs=2)
""")


def test_two_ranks_two_workers_see_every_record_exactly_once(tmp_path):
    n = _write_buffer(tmp_path / "buf" if (tmp_path / "buf").mkdir() is None else tmp_path)
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    port = str(29500 + os.getpid() % 1000)
    subprocess.run([sys.executable, str(script), str(tmp_path / "buf"), str(tmp_path)], check=True, timeout=120,
                   env={**os.environ, "PORT": port})
    per_rank = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(range(n))


def _bad_buffer(tmp_path):
    good = Rollout(input_ids=[1, 2], roles=[0, 1], group_id="g").to_json()
    path = tmp_path / "bad.jsonl"
    lines = [good, good, '{"input_ids": [1, 2], "roles": [0, 9], "group_id": "h"}', "not json", good]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_record_raise_names_file_line_field(tmp_path):
    path = _bad_buffer(tmp_path)
    with pytest.raises(BadRecordError) as info:
        list(RolloutBuffer(path, shuffle=False))
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, "roles")
    assert str(err).startswith(f"{path}:3: field 'roles': expected a list of role integers")


def test_bad_record_skip_counts_and_logs(tmp_path, caplog):
    path = _bad_buffer(tmp_path)
    with caplog.at_level(logging.WARNING):
        items = list(RolloutBuffer(path, shuffle=False, on_bad_record="skip"))
    assert len(items) == 3 and sum(i.skipped for i in items) == 2
    assert f"{path}:3: field 'roles'" in caplog.text and f"{path}:4: field '<record>'" in caplog.text


def test_damaged_gzip(tmp_path):
    lines = [Rollout(input_ids=[(i * 7919 + k * 104729) % 50000 for k in range(20)], roles=[0, 1] * 10).to_json()
             for i in range(200)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError, match=r"cut.jsonl.gz: damaged after line \d+ \(the last line read whole\)"):
        list(RolloutBuffer(path, shuffle=False))
    kept = list(RolloutBuffer(path, shuffle=False, on_bad_record="skip"))
    assert 50 < len(kept) < 200  # everything before the cut (the cut line itself is a skipped bad record)
    assert [i.rollout.input_ids for i in kept] == [Rollout.from_json(x).input_ids for x in lines[: len(kept)]]


def test_streams_through_dataloader_workers(tmp_path):
    n = _write_buffer(tmp_path)
    loader = DataLoader(RolloutBuffer(tmp_path), batch_size=None, num_workers=2)
    assert sorted(item.rollout.metadata["id"] for item in loader) == list(range(n))
    assert torch.utils.data.get_worker_info() is None


# ---------------------------------------------------------------- reliability (issue 10 items 2, 4, 5; issue 12)
GOOD = Rollout(input_ids=[1, 2, 3], roles=[0, 1, 2], reward=1.0, group_id="ok").to_json()

# One line per per-record error class that once escaped on_bad_record="skip" or reached training unlocated,
# with the field the error must name.
BAD_LINES = [
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": 1' + "0" * 5000 + "}", "<record>"),  # > 4300 digits
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": 1' + "0" * 400 + "}", "reward"),  # isfinite overflow
    ('{"input_ids": [1, 2], "roles": [0, 1], "advantage": 1e39}', "advantage"),  # beyond float32
    ('{"input_ids": [1, 2], "roles": [0, 1], "reward": 1e200}', "reward"),
    ('{"input_ids": [1, 2], "roles": [0, 1], "logprobs": [null, -1e39]}', "logprobs"),
    ('{"input_ids": [1, 9223372036854775808], "roles": [0, 1]}', "input_ids"),  # 2**63
    ('{"input_ids": [1, 2], "roles": [0, 1], "policy_version": 9223372036854775808}', "policy_version"),
    ('{"input_ids": [1, 100000], "roles": [0, 1]}', "input_ids"),  # >= len(tokenizer)
    ('{"input_ids": [1, 2], "roles": [0, 1], "tokenizer_fingerprint": "49152-0123456789abcdef"}',
     "tokenizer_fingerprint"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\ud800"}]}',
     "messages[1].content"),  # lone surrogate: the tokenizer raised TypeError
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "x": 1}',
     None),  # fine
]


def _bad_lines_file(tmp_path):
    lines = [GOOD] + [line for line, _ in BAD_LINES] + [GOOD]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    return path


def test_every_per_record_error_is_located_and_skippable(tmp_path, tiny_tokenizer):
    path = _bad_lines_file(tmp_path)
    for number, (_, field) in enumerate(BAD_LINES, start=2):
        if field is None:
            continue
        only = tmp_path / f"only{number}.jsonl"
        only.write_bytes(path.read_bytes().splitlines(keepends=True)[number - 1])
        with pytest.raises(BadRecordError) as info:
            list(RolloutBuffer(only, tiny_tokenizer, shuffle=False))
        assert (info.value.path, info.value.line, info.value.field) == (str(only), 1, field)
    items = list(RolloutBuffer(path, tiny_tokenizer, shuffle=False, on_bad_record="skip"))
    bad = sum(field is not None for _, field in BAD_LINES)
    assert len(items) == 2 + len(BAD_LINES) - bad and sum(i.skipped for i in items) == bad


def test_skip_catches_template_errors_and_a_missing_tokenizer(tmp_path, tiny_tokenizer):
    messages = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = tmp_path / "m.jsonl"
    path.write_text(GOOD + "\n" + messages + "\n")
    # No tokenizer: a located record error (it was a bare ValueError that stopped skip mode).
    with pytest.raises(BadRecordError, match=r"m.jsonl:2: field 'messages': expected a tokenizer"):
        list(RolloutBuffer(path, shuffle=False))
    assert [i.skipped for i in RolloutBuffer(path, shuffle=False, on_bad_record="skip")] == [0]
    # A template that cannot give exact roles (it strips contents): ChatTemplateError -> a bad record.
    stripping = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    stripping.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
                               "{% endfor %}")
    path.write_text(GOOD + "\n" + messages.replace('"a"', '" a "') + "\n")
    with pytest.raises(BadRecordError, match=r"m.jsonl:2: field 'messages': expected a conversation the chat"):
        list(RolloutBuffer(path, stripping, shuffle=False))
    assert len(list(RolloutBuffer(path, stripping, shuffle=False, on_bad_record="skip"))) == 1


def _gz_lines(n):
    return [Rollout(input_ids=[(i * 7919 + k * 104729) % 500 for k in range(20)], roles=[0, 1] * 10,
                    group_id=f"g{i // 3}", reward=float(i % 2)).to_json() for i in range(n)]


@pytest.mark.parametrize("damage", ["cut", "corrupt-middle", "not-gzip", "trailing-garbage"])
def test_damaged_gzip_keeps_the_records_before_and_reports_one_error(tmp_path, damage, caplog):
    lines = _gz_lines(300)
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    at = len(data) // 2
    damaged = {"cut": data[:at], "corrupt-middle": data[:at] + bytes(64) + data[at + 64:],
               "not-gzip": ("\n".join(lines[:3]) + "\n").encode(), "trailing-garbage": data + b"garbage!"}[damage]
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(damaged)
    good = tmp_path / "e.jsonl"
    good.write_text(GOOD + "\n")
    # Lines decodable from the bytes before the damage must all be kept, in order.
    whole = zlib.decompressobj(wbits=31).decompress(damaged[:at]) if damage != "not-gzip" else b""
    if damage == "trailing-garbage":
        whole = ("\n".join(lines) + "\n").encode()
    sure = whole.count(b"\n")
    with pytest.raises((DamagedFileError, BadRecordError)) as info:
        list(RolloutBuffer([path, good], shuffle=False))
    err = info.value
    if isinstance(err, BadRecordError):  # bytes decoded wrongly before deflate noticed: a located bad line
        assert err.path == str(path) and err.line > sure
    else:
        assert err.path == str(path) and str(err).startswith(f"{path}: damaged after line {err.last_good_line} ")
        assert err.last_good_line >= sure
    with caplog.at_level(logging.WARNING):
        first = list(RolloutBuffer([path, good], shuffle=False, on_bad_record="skip"))
        stream = iter(RolloutBuffer([path, good], shuffle=False, on_bad_record="skip", repeat=True))
        for _ in range(3 * len(first)):  # three passes
            next(stream)
    assert [i.rollout.input_ids for i in first[:sure]] == [json.loads(x)["input_ids"] for x in lines[:sure]]
    assert first[-1].rollout.input_ids == [1, 2, 3] and sum(i.skipped for i in first) >= 1
    assert caplog.text.count("damaged after line") == 2  # once per stream, though the second read it 3 times


def test_empty_gzip_is_like_empty_jsonl_and_a_bom_is_accepted(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + GOOD.encode() + b"\n"))
    items = list(RolloutBuffer(tmp_path, shuffle=False))
    assert len(items) == 2 and all(i.skipped == 0 for i in items)
    for name in ("empty.jsonl", "empty.jsonl.gz"):
        with pytest.raises(EmptyStreamError, match="the files hold no records"):
            list(RolloutBuffer(tmp_path / name))


EMPTY_SCRIPT = textwrap.dedent("""
    import sys
    from lit_echo.data.buffer import RolloutBuffer
    buffer = RolloutBuffer(sys.argv[1], repeat=True, on_bad_record=sys.argv[2], shard=(int(sys.argv[3]), 2))
    next(iter(buffer))
""")


@pytest.mark.parametrize("content, mode, index, expect", [
    ("", "raise", 0, "the files hold no records"),
    ("not json\n" * 2000, "skip", 0, "every record of this reader's"),
    (GOOD + "\n", "raise", 1, "fewer than the 2 readers"),
])
def test_an_endless_stream_without_rollouts_raises_instead_of_spinning(tmp_path, content, mode, index, expect):
    """Was an endless loop at 100% CPU (1.9 million warnings in skip mode); the timeout only ends the old hang."""
    path = tmp_path / "b.jsonl"
    path.write_text(content)
    proc = subprocess.run([sys.executable, "-c", EMPTY_SCRIPT, str(path), mode, str(index)], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "EmptyStreamError" in proc.stderr and expect in proc.stderr
    assert proc.stderr.count("skipping bad record") <= 10  # the rest are summarized


def test_group_reward_mean_is_the_whole_groups_in_a_shuffled_buffer(tmp_path):
    _write_buffer(tmp_path)
    means = {}
    for item in RolloutBuffer(tmp_path, shuffle=False):
        means.setdefault(item.rollout.group_id, []).append(item.rollout.reward)
    means = {g: sum(r) / len(r) for g, r in means.items()}
    collate = RolloutCollator(pad_token_id=0)
    loader = DataLoader(RolloutBuffer(tmp_path, shuffle=True, shuffle_buffer=4, seed=5), batch_size=3,
                        collate_fn=collate)
    partial_groups = 0
    for batch in loader:
        for group, mean in zip(batch["group_ids"], batch["group_reward_mean"].tolist()):
            assert mean == pytest.approx(means[group])
        in_batch = Counter(batch["group_ids"])
        partial_groups += sum(n < 1 + int(g[1:]) % 4 for g, n in in_batch.items())
    assert partial_groups > 5  # batches did hold parts of groups, and the means were still the whole group's


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    path = tmp_path / "b.jsonl"
    path.write_text("not json\n" * 500 + GOOD + "\n")
    stream = iter(RolloutBuffer(path, shuffle=False, on_bad_record="skip", repeat=True))
    with caplog.at_level(logging.WARNING):
        items = [next(stream) for _ in range(20)]  # twenty passes over 501 lines
    assert items[0].skipped == 500 and all(i.skipped == 500 for i in items[1:])
    assert caplog.text.count("skipping bad record") == 10 and caplog.text.count("bad record(s) in a pass") == 1
