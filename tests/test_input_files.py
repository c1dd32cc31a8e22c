"""Files the user hands us, and files that hold users' prompts (issue 33, items 6, 8-11 and 14).

Recorded prompts (traffic shards, adapt's ``adapt_data/``) are private whatever folder they land in; a prompt
file, a traffic shard or a data folder that is not what it should be is refused with a message naming the file,
the line and what is wrong, never a bare KeyError, AttributeError or "line 1 column 1".
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from conftest import make_drafter, make_target

import dflash_hf.cli as cli
from dflash_hf.training.data import count_records, load_prompts, load_records, regenerate, write_shards
from dflash_hf.training.traffic import (
    ShardFolder,
    TrafficRecorder,
    build_adapt_data,
    read_openai_chat_log,
    read_traffic,
    record_traffic,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def traffic_line(when: float, **changes) -> str:
    record = {"time": when, "prompt_ids": [1, 2, 3], "generated_ids": [10, 11, 12, 13],
              "sampling": {"do_sample": False, "max_new_tokens": 8}, "acceptance_lengths": [2, 2]}
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def write_lines(path: Path, *lines: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------------------------
# 6. Recorded prompts are readable by their owner only
# ---------------------------------------------------------------------------------------------------------------
def test_traffic_shards_are_private_in_a_folder_others_can_read(tmp_path, umask_022, caplog):
    folder = tmp_path / "traffic"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with caplog.at_level(logging.WARNING, logger="dflash_hf.training.traffic"):
        shards = ShardFolder(folder, None)
        first, second = shards.write(traffic_line(1) + "\n"), shards.write(traffic_line(2) + "\n")
        TrafficRecorder(folder).close()  # entering a recording block into the same folder
    assert mode(first) == mode(second) == 0o600
    warnings = [r.getMessage() for r in caplog.records if "readable by other users" in r.getMessage()]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "chmod 700" in warnings[0]
    assert mode(folder) == 0o755  # the user's folder is theirs to change


def test_a_traffic_folder_the_recorder_makes_is_private_and_not_warned_about(tmp_path, umask_022, caplog):
    folder = tmp_path / "new" / "traffic"
    with caplog.at_level(logging.WARNING, logger="dflash_hf.training.traffic"):
        shard = ShardFolder(folder, None).write(traffic_line(1) + "\n")
    assert mode(folder) == 0o700 and mode(shard) == 0o600
    assert not [r for r in caplog.records if "readable by other users" in r.getMessage()]


def test_adapt_data_is_private(tmp_path, umask_022):
    traffic = tmp_path / "traffic"
    shards = ShardFolder(traffic, None)
    for when in range(10):
        shards.write(traffic_line(when) + "\n")
    original = [{"prompt": f"p{i}", "input_ids": [3, 4, 5, 6, 7 + i], "prompt_len": 2} for i in range(10)]
    write_shards(original, tmp_path / "original", shard_size=4)
    build_adapt_data(traffic, tmp_path / "adapt", heldout_fraction=0.2, replay_data_dir=tmp_path / "original",
                     replay_fraction=0.5)
    folders = [tmp_path / "adapt", *(p for p in (tmp_path / "adapt").rglob("*") if p.is_dir())]
    files = [p for p in (tmp_path / "adapt").rglob("*") if p.is_file()]
    assert {p.name for p in folders} == {"adapt", "train", "heldout"}
    assert {str(p): mode(p) for p in folders} == {str(p): 0o700 for p in folders}
    assert files and {str(p): mode(p) for p in files} == {str(p): 0o600 for p in files}


# ---------------------------------------------------------------------------------------------------------------
# 8, 11. Prompt files: lines that are not objects, bad JSON, plain text, bytes that are not UTF-8
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, kind", [('"text"', "a string"), ("[1, 2]", "a list"), ("7", "a number")])
def test_prompt_lines_that_are_not_objects_name_the_file_and_line(tmp_path, line, kind):
    path = write_lines(tmp_path / "prompts.jsonl", '{"prompt": "first"}', "", line)
    with pytest.raises(ValueError) as caught:
        load_prompts(str(path))
    message = str(caught.value)
    assert f"{path}, line 3" in message and "JSON object" in message and kind in message


def test_a_messages_list_of_strings_is_not_an_attribute_error(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", '{"messages": ["hi"]}', '{"prompt": "kept"}')
    assert load_prompts(str(path)) == ["kept"]


def test_a_bad_json_line_names_its_own_line_number(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", '{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": "c",}')
    with pytest.raises(ValueError) as caught:
        load_prompts(str(path))
    message = str(caught.value)
    assert f"{path}, line 3" in message and "not valid JSON" in message and "line 1 column" not in message


def test_a_plain_text_prompt_list_says_what_a_prompt_file_is(tmp_path):
    path = write_lines(tmp_path / "prompts.txt", "Why is the sky blue?", "Write a haiku.")
    with pytest.raises(ValueError) as caught:
        load_prompts(str(path))
    message = str(caught.value)
    assert f"{path}, line 1" in message and '{"prompt": ' in message


def test_a_byte_that_is_not_utf8_names_the_line_and_column(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", '{"prompt": "a"}', b'{"prompt": "caf\xe9"}')
    with pytest.raises(ValueError) as caught:
        load_prompts(str(path))
    message = str(caught.value)
    assert f"{path}, line 2" in message and "0xe9" in message and "column 16" in message and "UTF-8" in message


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", '\ufeff{"prompt": "a"}', '{"prompt": "b"}')
    assert load_prompts(str(path)) == ["a", "b"]


def test_bench_prints_the_prompt_file_problem_as_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DFLASH_HF_CACHE", str(tmp_path / "cache"))
    path = write_lines(tmp_path / "prompts.jsonl", '{"prompt": "a"}', "oops")
    assert cli.main(["bench", "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"dflash-hf: error: {path}, line 2" in err and "Traceback" not in err


def test_an_openai_chat_log_with_a_byte_that_is_not_utf8_names_the_line(tmp_path):
    path = write_lines(tmp_path / "log.jsonl", '{"not": "a chat line"}', b'{"messages": "\xff"}')
    with pytest.raises(ValueError, match=rf"{path}, line 2: byte 0xff"):
        read_openai_chat_log(path, tokenizer=None)


# ---------------------------------------------------------------------------------------------------------------
# 9, 11. Traffic shards: missing keys, corrupt or cut-off lines
# ---------------------------------------------------------------------------------------------------------------
def test_a_traffic_record_missing_a_key_names_the_shard_line_and_key(tmp_path):
    shard = ShardFolder(tmp_path / "traffic", None).write(traffic_line(1) + "\n" + traffic_line(2, time=...) + "\n")
    with pytest.raises(ValueError) as caught:
        read_traffic(tmp_path / "traffic")
    message = str(caught.value)
    assert f"{shard}, line 2" in message and "'time'" in message


def test_a_traffic_record_of_the_wrong_types_is_refused(tmp_path):
    shard = ShardFolder(tmp_path / "traffic", None).write(traffic_line("noon") + "\n")
    with pytest.raises(ValueError, match=rf"{shard}, line 1: .*'time'"):
        read_traffic(tmp_path / "traffic")


def test_a_truncated_traffic_shard_names_the_shard_and_its_last_line(tmp_path):
    shard = ShardFolder(tmp_path / "traffic", None).write("\n".join(traffic_line(t) for t in range(3)) + "\n")
    shard.write_bytes(shard.read_bytes()[:-20])  # cut off mid-record, as a full disk or a copy would
    with pytest.raises(ValueError) as caught:
        read_traffic(tmp_path / "traffic")
    message = str(caught.value)
    assert f"{shard}, line 3" in message and "not valid JSON" in message and "line 1 column" not in message


def test_a_traffic_shard_with_a_byte_that_is_not_utf8_names_the_line(tmp_path):
    shard = ShardFolder(tmp_path / "traffic", None).write(traffic_line(1) + "\n")
    shard.write_bytes(shard.read_bytes() + b'{"time": "\x80"}\n')
    with pytest.raises(ValueError, match=rf"{shard}, line 2: byte 0x80"):
        read_traffic(tmp_path / "traffic")


# ---------------------------------------------------------------------------------------------------------------
# 10. A data folder holding shards this tool did not write
# ---------------------------------------------------------------------------------------------------------------
def test_an_unrelated_data_shard_is_refused_not_counted(tmp_path):
    data = tmp_path / "run" / "data"
    shard = write_lines(data / "shard-00000.jsonl", '{"text": "an unrelated corpus"}', '{"text": "line two"}')
    for read in (count_records, load_records):
        with pytest.raises(ValueError) as caught:
            read(data)
        message = str(caught.value)
        assert f"{shard}, line 1" in message and "not a data shard written by dflash-hf" in message
        assert "'input_ids'" in message and "--out" in message
    with pytest.raises(ValueError, match="not a data shard written by dflash-hf"):
        regenerate(None, None, ["a prompt"], data)  # refused before any model is asked for anything


@pytest.mark.parametrize("record", [{"input_ids": "1 2 3", "prompt_len": 1}, {"input_ids": [1, 2], "prompt_len": 5},
                                    {"input_ids": [1, 2], "prompt_len": "1"},
                                    {"input_ids": [1, 2, 3], "prompt_len": 1, "response_spans": [[1]]}])
def test_data_records_of_the_wrong_shape_are_refused(tmp_path, record):
    write_lines(tmp_path / "data" / "shard-00000.jsonl", json.dumps(record))
    with pytest.raises(ValueError, match="not a data shard written by dflash-hf"):
        count_records(tmp_path / "data")


def test_shards_this_tool_wrote_are_still_counted(tmp_path):
    records = [{"prompt": "p", "input_ids": [1, 2, 3], "prompt_len": 1},
               {"prompt": "q", "id": "c", "turns": [], "input_ids": [1, 2, 3, 4], "prompt_len": 1,
                "response_spans": [[1, 2], [3, 4]]}]
    write_shards(records, tmp_path / "data", shard_size=1)
    assert count_records(tmp_path / "data") == 2 and load_records(tmp_path / "data") == records


# ---------------------------------------------------------------------------------------------------------------
# 14. record_traffic into a path that cannot be a folder
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafter():
    return make_drafter(make_target("qwen3"))


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_record_traffic_into_a_file_is_refused_when_the_block_is_entered(drafter, tmp_path, where):
    regular = tmp_path / "traffic.jsonl"
    regular.write_text("not a folder\n")
    folder = regular if where == "file" else regular / "traffic"
    entered = False
    with pytest.raises(NotADirectoryError, match=rf"{regular} is a file"):
        with record_traffic(drafter, folder):
            entered = True
    assert not entered and regular.read_text() == "not a folder\n"
    assert not hasattr(drafter, "traffic_recorder")
