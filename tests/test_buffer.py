import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from lit_echo import BadRecordError, Rollout
from lit_echo.data.buffer import DamagedFileError, RolloutBuffer, expand_paths


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
    path.write_text("\n".join([good, good, '{"input_ids": [1, 2], "roles": [0, 9], "group_id": "h"}', "not json",
                               good]) + "\n")
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
