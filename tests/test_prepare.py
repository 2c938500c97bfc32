"""`prepare` end to end: sources, output folder, statistics, limits, errors and the CLI."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
from typer.testing import CliRunner

from gptoss_tune.cli import app
from gptoss_tune.data.prepare import PrepareOptions, prepare
from gptoss_tune.errors import DataError, GptossTuneError
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.vocab import harmony_encoding

from cases import ALL_ROWS, MESSAGES_ROWS

runner = CliRunner()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chats(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", list(MESSAGES_ROWS.values()))


def test_prepare_writes_a_loadable_dataset_with_info(chats, tmp_path):
    out = tmp_path / "out"
    info = prepare(str(chats), out, PrepareOptions())
    ds = datasets.load_from_disk(str(out))
    assert {"input_ids", "labels", "source_index", "turn", "length", "num_trained"} <= set(ds.column_names)
    assert len(ds) == info["stats"]["examples"]
    # rows in input order, a conversation's turns consecutive
    assert list(ds["source_index"]) == sorted(ds["source_index"])
    assert info["stats"]["conversations"] == len(MESSAGES_ROWS)
    assert info["stats"]["tokens"] == sum(ds["length"])
    assert info["stats"]["trained_tokens"] == sum(ds["num_trained"]) > 0
    saved = json.loads((out / "prepare.json").read_text())
    assert saved["options"]["date"] == "2025-08-05" and saved["options"]["loss_on"] == "turns"
    assert saved["vocab"]["sha256"] and saved["stats"]["length_histogram"]
    for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True):
        assert len(ids) == len(labels) and any(label != T.IGNORE_INDEX for label in labels)
        assert all(label in (T.IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))


@pytest.mark.parametrize("kind", ["json", "parquet", "csv", "folder", "saved", "saved_dict"])
def test_every_local_source_gives_the_same_examples(kind, tmp_path):
    rows = [ALL_ROWS["alpaca"], ALL_ROWS["alpaca_no_input"]]
    reference = tmp_path / "ref"
    prepare(str(write_jsonl(tmp_path / "a.jsonl", rows)), reference, PrepareOptions())
    if kind == "json":
        source = tmp_path / "a.json"
        source.write_text(json.dumps(rows))
    elif kind == "parquet":
        source = tmp_path / "a.parquet"
        pd.DataFrame(rows).to_parquet(source)
    elif kind == "csv":
        source = tmp_path / "a.csv"
        pd.DataFrame(rows).fillna("").to_csv(source, index=False)
    elif kind == "folder":
        source = tmp_path / "folder"
        source.mkdir()
        write_jsonl(source / "1.jsonl", rows[:1])
        write_jsonl(source / "2.jsonl", rows[1:])
    else:
        source = tmp_path / "saved"
        dataset = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": dataset}) if kind == "saved_dict" else dataset).save_to_disk(
            str(source)
        )
    out = tmp_path / "out"
    prepare(str(source), out, PrepareOptions())
    assert (
        datasets.load_from_disk(str(out))["input_ids"] == datasets.load_from_disk(str(reference))["input_ids"]
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}


def tool_row(tool: dict, arguments: dict, answer: str) -> dict:
    name = tool["function"]["name"]
    call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {
        "tools": [tool],
        "messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "thinking": "call it", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "result"},
            {"role": "assistant", "content": answer},
        ],
    }


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_arrow_sources_do_not_give_tools_the_fields_of_other_rows(kind, tmp_path):
    """Arrow fills every record with every field of its column (null where absent): those nulls must
    not reach a tool schema or the call's arguments."""
    rows = [tool_row(WEATHER, {"city": "Oslo"}, "Cold."), tool_row(ADD, {"a": 1, "b": 2}, "3")]
    reference = tmp_path / "ref"
    prepare(str(write_jsonl(tmp_path / "a.jsonl", rows)), reference, PrepareOptions())
    if kind == "parquet":
        source = tmp_path / "a.parquet"
        pd.DataFrame(rows).to_parquet(source)
    else:
        source = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(source))
    assert (
        datasets.Dataset.from_list(rows)[0]["tools"][0]["function"]["parameters"]["properties"]["a"] is None
    )
    out = tmp_path / "out"
    prepare(str(source), out, PrepareOptions())
    assert (
        datasets.load_from_disk(str(out))["input_ids"] == datasets.load_from_disk(str(reference))["input_ids"]
    )


def test_byte_order_marks_and_folder_leftovers_are_not_data(tmp_path):
    rows = [ALL_ROWS["alpaca"], ALL_ROWS["alpaca_no_input"]]
    prepare(str(write_jsonl(tmp_path / "a.jsonl", rows)), tmp_path / "ref", PrepareOptions())
    expected = datasets.load_from_disk(str(tmp_path / "ref"))["input_ids"]
    folder = tmp_path / "folder"
    folder.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text(text)
    prepare(str(folder), folder / "prepared", PrepareOptions())
    assert datasets.load_from_disk(str(folder / "prepared"))["input_ids"] == expected
    # again, with the first output inside the folder: it is not read as data
    prepare(str(folder), folder / "prepared", PrepareOptions(), overwrite=True)
    assert datasets.load_from_disk(str(folder / "prepared"))["input_ids"] == expected
    csv = tmp_path / "a.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + pd.DataFrame(rows).fillna("").to_csv(index=False).encode())
    prepare(str(csv), tmp_path / "c", PrepareOptions())
    assert datasets.load_from_disk(str(tmp_path / "c"))["input_ids"] == expected


def test_a_prompts_example_answers_are_never_trained(tmp_path):
    row = {
        "prompt": [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ],
        "completion": "A2",
    }
    source = write_jsonl(tmp_path / "p.jsonl", [row])
    encoding = harmony_encoding()
    for policy in ("turns", "last", "assistant", "final"):
        out = tmp_path / policy
        info = prepare(str(source), out, PrepareOptions(loss_on=policy))
        assert info["stats"]["examples"] == 1, policy
        example = datasets.load_from_disk(str(out))[0]
        trained = encoding.decode([label for label in example["labels"] if label != T.IGNORE_INDEX])
        assert "A2" in trained and "A1" not in trained, policy
    info = prepare(str(source), tmp_path / "all", PrepareOptions(loss_on="all"))
    assert info["stats"]["trained_tokens"] == info["stats"]["tokens"]


def test_prepare_counts_the_tool_thinking_the_official_template_leaves_out(tmp_path):
    rows = [tool_row(WEATHER, {"city": "Oslo"}, "Cold."), ALL_ROWS["mt"]]
    source = write_jsonl(tmp_path / "t.jsonl", rows)
    hf = prepare(str(source), tmp_path / "hf", PrepareOptions())
    harmony = prepare(str(source), tmp_path / "harmony", PrepareOptions(template="harmony"))
    assert (hf["stats"]["tool_thinking_left_out"], harmony["stats"]["tool_thinking_left_out"]) == (1, 0)
    result = runner.invoke(app, ["prepare", str(source), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0 and "--template harmony trains what inference shows" in " ".join(
        result.output.split()
    )


def test_prepare_counts_empty_answers(tmp_path):
    rows = [{"instruction": "Say nothing", "output": ""}, ALL_ROWS["alpaca"]]
    info = prepare(str(write_jsonl(tmp_path / "a.jsonl", rows)), tmp_path / "o", PrepareOptions())
    assert info["stats"]["empty_answers"] == 1 and info["stats"]["examples"] == 2


def test_a_tool_schema_the_official_template_cannot_write_names_the_row(tmp_path):
    undescribed = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    rows = [ALL_ROWS["mt"], tool_row(undescribed, {}, "Noon.")]
    source = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare(str(source), tmp_path / "out", PrepareOptions())
    assert (info.value.file, info.value.row, info.value.field) == (str(source), "line 2", "tools")
    assert "--template harmony" in str(info.value) and not (tmp_path / "out").exists()
    skipped = prepare(str(source), tmp_path / "skip", PrepareOptions(skip_invalid=True))
    assert skipped["stats"]["skipped"] == {"invalid_tools": 1} and skipped["stats"]["conversations"] == 1
    # openai-harmony writes a function without a description
    assert (
        prepare(str(source), tmp_path / "h", PrepareOptions(template="harmony"))["stats"]["conversations"]
        == 2
    )


def test_an_output_path_that_is_a_file_is_refused_before_the_work(chats, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(GptossTuneError, match="is a file"):
            prepare(str(chats), taken, PrepareOptions(), overwrite=overwrite)
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("date", ["20250805", "2025-W32-2", "2025-8-5", "2025-02-30"])
def test_dates_must_be_written_year_month_day(date):
    with pytest.raises(GptossTuneError, match="YYYY-MM-DD"):
        PrepareOptions(date=date)


def test_bundled_sample_prepares_with_every_policy(tmp_path):
    counts = {}
    for policy in ("turns", "last", "assistant", "final", "all"):
        info = prepare("sample", tmp_path / policy, PrepareOptions(loss_on=policy))
        counts[policy] = info["stats"]
    assert counts["turns"]["examples"] > counts["last"]["examples"] == counts["turns"]["conversations"] >= 30
    assert (
        counts["final"]["trained_tokens"]
        < counts["last"]["trained_tokens"]
        <= counts["assistant"]["trained_tokens"]
    )
    assert counts["all"]["trained_tokens"] == counts["all"]["tokens"]


def test_malformed_line_stops_with_location_and_leaves_nothing(chats, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text() + '{"messages": [oops\n', encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare(str(bad), out, PrepareOptions())
    assert f"line {len(MESSAGES_ROWS) + 1}" in str(info.value) and "malformed JSON" in str(info.value)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_skip_invalid_counts_reasons(chats, tmp_path):
    bad = tmp_path / "bad.jsonl"
    extra = [
        '{"messages": [oops',
        json.dumps({"messages": [{"role": "user", "content": "only"}]}),
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
    ]
    bad.write_text(chats.read_text() + "\n".join(extra) + "\n", encoding="utf-8")
    info = prepare(str(bad), tmp_path / "out", PrepareOptions(skip_invalid=True))
    assert info["stats"]["skipped"] == {"malformed_json": 1, "no_assistant": 1, "unknown_role": 1}
    assert info["stats"]["conversations"] == len(MESSAGES_ROWS)


def test_max_length_drops_or_truncates(tmp_path):
    long_row = {
        "messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok " * 50}]
    }
    source = write_jsonl(tmp_path / "l.jsonl", [long_row, ALL_ROWS["no_system_no_thinking"]])
    dropped = prepare(str(source), tmp_path / "a", PrepareOptions(max_length=200))
    assert dropped["stats"]["skipped"] == {"too_long": 1} and dropped["stats"]["examples"] == 1
    # the head of the long example holds no trained token: still dropped
    truncated = prepare(str(source), tmp_path / "b", PrepareOptions(max_length=200, truncate=True))
    assert truncated["stats"]["skipped"] == {"too_long": 1}
    kept = prepare(str(source), tmp_path / "c", PrepareOptions(max_length=400, truncate=True))
    assert kept["stats"]["truncated"] == 1 and kept["stats"]["max_length"] == 400


def test_no_trained_tokens_are_never_written(tmp_path):
    # `final` on a conversation that ends with a tool call has no final message to train
    source = write_jsonl(tmp_path / "t.jsonl", [ALL_ROWS["tool_call_content_as_analysis"], ALL_ROWS["mt"]])
    info = prepare(str(source), tmp_path / "o", PrepareOptions(loss_on="final"))
    assert info["stats"]["skipped"] == {"no_trained_tokens": 1} and info["stats"]["examples"] == 1


def test_existing_output_is_not_overwritten_without_flag(chats, tmp_path):
    out = tmp_path / "out"
    prepare(str(chats), out, PrepareOptions())
    with pytest.raises(GptossTuneError, match="--overwrite"):
        prepare(str(chats), out, PrepareOptions())
    prepare(str(chats), out, PrepareOptions(loss_on="last"), overwrite=True)
    assert json.loads((out / "prepare.json").read_text())["options"]["loss_on"] == "last"


def test_cli_prepare_and_inspect(chats, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "prepare",
            str(chats),
            "--output",
            str(out),
            "--template",
            "harmony",
            "--loss-on",
            "last",
            "--date",
            "2024-01-02",
            "--reasoning-effort",
            "low",
        ],
    )
    assert result.exit_code == 0, result.output
    options = json.loads((out / "prepare.json").read_text())["options"]
    assert (options["template"], options["loss_on"], options["date"], options["reasoning_effort"]) == (
        "harmony",
        "last",
        "2024-01-02",
        "low",
    )
    shown = runner.invoke(app, ["inspect", str(out), "--index", "0", "--plain"])
    assert shown.exit_code == 0
    assert "⟦<|channel|>analysis<|message|>L'utilisateur" in shown.output and "loss_on=last" in shown.output
    assert "Current date: 2024-01-02" in shown.output
    assert runner.invoke(app, ["inspect", str(out), "--index", "99"]).exit_code != 0


def test_cli_bad_input_exits_nonzero_with_location(tmp_path):
    import subprocess
    import sys

    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 1}]}],
    )
    result = subprocess.run(
        [sys.executable, "-m", "gptoss_tune.cli", "prepare", str(bad), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert (
        "bad.jsonl, line 1, field 'messages[1].content'" in result.stderr and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_help_shows_every_option_with_default():
    result = runner.invoke(app, ["prepare", "--help"], env={"COLUMNS": "200"})
    for option in (
        "--template",
        "--loss-on",
        "--date",
        "--reasoning-effort",
        "--format",
        "--max-length",
        "--truncate",
        "--skip-invalid",
        "--split",
        "--subset",
        "--overwrite",
    ):
        assert option in result.output
    assert "default: turns" in result.output and "default: 2025-08-05" in result.output


def test_hub_ids_go_through_datasets_with_split_and_subset(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        rows = [ALL_ROWS["alpaca"], ALL_ROWS["alpaca_no_input"]]
        return (
            datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
            if split is None
            else (datasets.Dataset.from_list(rows))
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    info = prepare(
        "HuggingFaceH4/Multilingual-Thinking", tmp_path / "a", PrepareOptions(subset="x", split="train")
    )
    assert (
        calls[-1] == ("HuggingFaceH4/Multilingual-Thinking", "x", "train") and info["stats"]["examples"] == 2
    )
    prepare("owner/name", tmp_path / "b", PrepareOptions())
    assert calls[-1] == ("owner/name", None, None)


def test_unreachable_hub_says_what_to_do(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GptossTuneError, match="Offline\\? .*local"):
        prepare("owner/name", tmp_path / "o", PrepareOptions())
    with pytest.raises(GptossTuneError, match="no such file"):
        prepare(str(tmp_path / "missing.jsonl"), tmp_path / "o", PrepareOptions())


def test_inspect_with_colors(chats, tmp_path):
    out = tmp_path / "out"
    prepare(str(chats), out, PrepareOptions())
    shown = runner.invoke(app, ["inspect", str(out), "-i", "-1"])
    assert shown.exit_code == 0 and "trained" in shown.output and "legend" in shown.output


def test_every_command_documents_every_option():
    import typer.main

    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        for param in sub.params:
            if param.param_type_name == "option" and param.name not in ("help",):
                assert param.help, f"{name} --{param.name} has no help text"
