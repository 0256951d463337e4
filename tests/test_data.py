"""Dataset prep: readers, format detection, templates, cleaning rules, token masks, splits and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from kubetune.config import DataConfig
from kubetune.data import load_prepared, prepare_dataset
from kubetune.errors import KubetuneError
from kubetune.sample_data import TCM_DEMO_FILE
from kubetune.sample_data.generate import generate, write

SAMPLE_FILE = Path(__file__).resolve().parents[1] / "kubetune" / "sample_data" / TCM_DEMO_FILE
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def tokenizer():
    from kubetune.tiny import make_tokenizer

    return make_tokenizer()


def alpaca_rows(n: int = 12) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "instruction": f"久咳不愈怎么治疗？ case {i}",
                "input": "干咳少痰，舌红少苔" if i % 3 == 0 else "",
                "output": f"辨证属肺阴虚，治宜滋阴润肺，方用沙参麦冬汤。 answer {i}",
                "source": "synthetic",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prep(tmp_path: Path, tokenizer, dataset: Path | str, **settings):
    config = DataConfig(dataset=str(dataset), **settings)
    train, evaluation = tmp_path / "out" / "train.parquet", tmp_path / "out" / "eval.parquet"
    result = prepare_dataset(config, tokenizer, str(train), str(evaluation))
    return result, pq.read_table(train).to_pylist(), pq.read_table(evaluation).to_pylist()


def answer_tokens(row: dict) -> list[int]:
    return [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m]


def prompt_tokens(row: dict) -> list[int]:
    return [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if not m]


# ---------------------------------------------------------------------------------------------- sample data


def test_sample_dataset_is_small_mixed_and_regenerates_identically(tmp_path):
    assert SAMPLE_FILE.stat().st_size <= 1_000_000
    rows = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    assert 400 <= len(rows) <= 600
    chinese = [r for r in rows if CJK.search(r["instruction"] + r["output"])]
    english = [r for r in rows if not CJK.search(r["instruction"] + r["output"])]
    assert 0.55 < len(chinese) / len(rows) < 0.75 and english
    assert any("氣" in r["output"] or "熱" in r["output"] for r in chinese)  # some Traditional characters
    assert all(set(r) >= {"instruction", "input", "output", "source"} for r in rows)
    assert all("synthetic" in r["source"] for r in rows)
    assert any(r["input"] for r in rows)
    assert any("久咳不愈" in r["instruction"] for r in rows)
    assert any("persistent cough" in r["instruction"] for r in rows)
    assert sum(not r["output"].strip() for r in rows) >= 1
    assert len({json.dumps(r, sort_keys=True) for r in rows}) < len(rows)  # exact duplicates included
    assert write(tmp_path / "again.jsonl") == len(rows)
    assert (tmp_path / "again.jsonl").read_bytes() == SAMPLE_FILE.read_bytes()
    assert generate() == rows


def test_bundled_dataset_preps_and_cleaning_removes_its_dirty_rows(tmp_path, tokenizer):
    result, train, evaluation = prep(tmp_path, tokenizer, "kubetune://tcm-demo")
    stats = result.stats
    assert result.format == "alpaca"
    assert stats["rows_in"] == 497
    assert stats["dropped_empty"] == 2 and stats["dropped_duplicate"] == 3
    assert stats["rows_kept"] == stats["train_rows"] + stats["eval_rows"] == len(train) + len(evaluation)
    assert stats["rows_per_s"] > 0 and stats["length_p50"] <= stats["length_p90"] <= stats["length_max"]
    assert stats["total_train_tokens"] == sum(r["length"] for r in train)
    assert "| rows_in | 497 |" in result.summary_markdown
    assert set(train[0]) == {"prompt", "completion", "input_ids", "completion_mask", "length"}
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no staging files left
    loaded = load_prepared(str(tmp_path / "out" / "train.parquet"))
    assert loaded.num_rows == len(train) and loaded[0]["input_ids"] == train[0]["input_ids"]


# ---------------------------------------------------------------------------------------------- readers


def _write_all_formats(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["json_object"] = tmp_path / "obj.json"
    paths["json_object"].write_text(json.dumps({"data": rows}, ensure_ascii=False), encoding="utf-8")
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["csv"] = tmp_path / "d.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows), paths["csv"])
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows[:5])
    write_jsonl(folder / "part-1.jsonl", rows[5:])
    (folder / "README.md").write_text("not data")
    paths["folder"] = folder
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_object", "parquet", "csv", "folder"])
def test_each_reader_gives_the_same_samples(tmp_path, tokenizer, kind):
    rows = alpaca_rows()
    paths = _write_all_formats(tmp_path, rows)
    result, train, evaluation = prep(tmp_path, tokenizer, paths[kind])
    assert result.format == "alpaca" and result.stats["rows_in"] == len(rows)
    got = sorted(r["completion"] for r in train + evaluation)
    assert got == sorted(r["output"] for r in rows)
    with_input = [r for r in train + evaluation if "### Input:\n干咳少痰" in r["prompt"]]
    assert len(with_input) == sum(bool(r["input"]) for r in rows)


def test_fsspec_uris_read_files_and_folders(tmp_path, tokenizer):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    rows = alpaca_rows(6)
    with memory.open("/kubetune-test/jsonl/part-0.jsonl", "w") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with memory.open("/kubetune-test/parquet/part-0.parquet", "wb") as handle:
        pq.write_table(pa.Table.from_pylist(rows), handle)
    for uri in (
        "memory://kubetune-test/jsonl/part-0.jsonl",
        "memory://kubetune-test/jsonl",
        "memory://kubetune-test/parquet",
    ):
        result, _, _ = prep(tmp_path, tokenizer, uri)
        assert result.stats["rows_in"] == 6, uri
    memory.rm("/kubetune-test", recursive=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "local.parquet")
    assert prep(tmp_path, tokenizer, f"file://{tmp_path / 'local.parquet'}")[0].stats["rows_in"] == 6


# ---------------------------------------------------------------------------------------------- formats


def test_detects_chat_format_and_renders_both_styles(tmp_path, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"肺阴虚有哪些表现？ {i}"},
                {"role": "assistant", "content": f"干咳少痰，口燥咽干。 {i}"},
            ],
            "id": i,
        }
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result, train, _ = prep(tmp_path, tokenizer, path, prompt_style="chat", persona="You are a TCM expert.")
    assert result.format == "chat"
    row = train[0]
    question = row["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a TCM expert."}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert row["prompt"] == expected
    assert row["completion"].startswith("干咳少痰")
    assert prompt_tokens(row) == tokenizer(expected, add_special_tokens=False)["input_ids"]

    _, train, _ = prep(tmp_path, tokenizer, path, prompt_style="expert", persona="You are a TCM expert.")
    assert train[0]["prompt"].startswith("You are a TCM expert.\n\n### Instruction:\n肺阴虚有哪些表现？")
    assert train[0]["prompt"].endswith("### Response:\n")


def test_chat_rows_from_parquet(tmp_path, tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(4)
    ]
    rows.append({"messages": [{"role": "user", "content": "no answer yet"}]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    result, train, evaluation = prep(tmp_path, tokenizer, tmp_path / "chat.parquet", prompt_style="chat")
    assert result.format == "chat" and result.stats["dropped_empty"] == 1
    assert sorted(r["completion"] for r in train + evaluation) == ["a0", "a1", "a2", "a3"]


def test_expert_prompt_starts_with_the_tokenizers_bos(tmp_path, tokenizer):
    import copy

    from tokenizers import processors

    with_bos = copy.deepcopy(tokenizer)
    bos = "<|im_start|>"
    bos_id = with_bos.convert_tokens_to_ids(bos)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, bos_id)]
    )
    path = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(4))
    _, train, _ = prep(tmp_path, with_bos, path)
    assert train[0]["input_ids"][0] == bos_id
    assert prompt_tokens(train[0]) == with_bos(train[0]["prompt"])["input_ids"]
    _, train, _ = prep(tmp_path, with_bos, path, prompt_style="chat")
    assert prompt_tokens(train[0]) == with_bos(train[0]["prompt"], add_special_tokens=False)["input_ids"]


def test_multi_turn_chat_is_flattened_for_the_expert_template(tmp_path, tokenizer):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Row persona."},
                {"from": "human", "value": "I cough."},
                {"from": "gpt", "value": "For how long?"},
                {"from": "human", "value": f"Two months {i}."},
                {"from": "gpt", "value": f"That is a persistent cough {i}."},
            ]
        }
        for i in range(3)
    ]
    result, train, evaluation = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "sharegpt.jsonl", rows))
    assert result.format == "chat" and result.columns == {"messages": "conversations"}
    row = (train + evaluation)[0]
    assert row["prompt"].startswith(
        "Row persona.\n\n### Instruction:\nUser: I cough.\n\nAssistant: For how long?"
    )
    assert row["completion"].startswith("That is a persistent cough")


def test_detects_prompt_completion_and_aliases(tmp_path, tokenizer):
    pc_rows = [
        {"prompt": f"What is Feishu {i}?", "completion": f"A point on the back {i}."} for i in range(4)
    ]
    result, train, _ = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "pc.jsonl", pc_rows), persona="")
    assert result.format == "prompt_completion"
    assert train[0]["prompt"].startswith("### Instruction:\nWhat is Feishu")

    qa_rows = [{"question": f"Q{i}", "answer": f"A{i}", "extra": [1, 2]} for i in range(4)]
    result, _, _ = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "qa.jsonl", qa_rows))
    assert result.format == "prompt_completion"
    assert result.columns == {"prompt": "question", "completion": "answer"}


def test_explicit_column_mapping_overrides_detection(tmp_path, tokenizer):
    rows = [{"frage": f"久咳 {i}", "kontext": "", "antwort": f"润肺 {i}", "output": 5} for i in range(4)]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    result, train, _ = prep(
        tmp_path, tokenizer, path, instruction_column="frage", input_column="kontext", output_column="antwort"
    )
    assert result.format == "alpaca"
    assert result.columns == {"instruction": "frage", "output": "antwort", "input": "kontext"}
    assert train[0]["completion"].startswith("润肺")

    result, _, _ = prep(tmp_path, tokenizer, path, prompt_column="frage", completion_column="antwort")
    assert result.format == "prompt_completion"


def test_expert_template_exact_text(tmp_path, tokenizer):
    rows = [
        {"instruction": "辨证", "input": "咳嗽", "output": "风寒咳嗽"},
        {"instruction": "What is Hegu?", "input": " ", "output": "LI4."},
    ]
    _, train, evaluation = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "t.jsonl", rows), persona="P.")
    prompts = {r["completion"]: r["prompt"] for r in train + evaluation}
    assert prompts["风寒咳嗽"] == "P.\n\n### Instruction:\n辨证\n\n### Input:\n咳嗽\n\n### Response:\n"
    assert prompts["LI4."] == "P.\n\n### Instruction:\nWhat is Hegu?\n\n### Response:\n"


# ---------------------------------------------------------------------------------------------- cleaning


def test_each_cleaning_rule_is_counted(tmp_path, tokenizer):
    rows = alpaca_rows(6)
    rows += [dict(rows[0]), dict(rows[1])]  # 2 exact duplicates
    rows += [{"instruction": "空", "output": ""}, {"instruction": "空白", "output": " \n "}]  # 2 empty
    rows += [{"instruction": "long", "output": "很长的回答。" * 400}]  # too long for 128 tokens
    path = write_jsonl(tmp_path / "dirty.jsonl", rows)

    result, _, _ = prep(tmp_path, tokenizer, path, max_length=128, length_policy="drop", persona="P.")
    stats = result.stats
    assert (stats["rows_in"], stats["dropped_empty"], stats["dropped_duplicate"]) == (11, 2, 2)
    assert (stats["dropped_too_long"], stats["truncated"], stats["rows_kept"]) == (1, 0, 6)

    result, train, evaluation = prep(
        tmp_path, tokenizer, path, max_length=128, length_policy="truncate", persona="P."
    )
    assert (result.stats["dropped_too_long"], result.stats["truncated"], result.stats["rows_kept"]) == (
        0,
        1,
        7,
    )
    assert max(r["length"] for r in train + evaluation) == 128


def test_truncation_keeps_the_prompt_and_the_limit(tmp_path, tokenizer):
    answer = "肺阴虚者治宜滋阴润肺。" * 200
    rows = [{"instruction": f"久咳不愈 {i}", "output": answer} for i in range(3)]
    _, train, evaluation = prep(
        tmp_path, tokenizer, write_jsonl(tmp_path / "long.jsonl", rows), max_length=96, persona="P."
    )
    for row in train + evaluation:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert row["length"] == len(row["input_ids"]) == 96
        assert prompt_tokens(row) == prompt_ids
        assert (
            answer_tokens(row)
            == tokenizer(answer, add_special_tokens=False)["input_ids"][: 96 - len(prompt_ids)]
        )
        assert row["input_ids"][-1] != tokenizer.eos_token_id  # the answer goes on: no stop taught here
        assert row["completion"] == answer


def test_instruction_longer_than_the_limit_is_dropped_even_when_truncating(tmp_path, tokenizer):
    rows = [{"instruction": "咳" * 300, "output": "答"}] + alpaca_rows(3)
    result, _, _ = prep(
        tmp_path, tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), max_length=64, persona="P."
    )
    assert result.stats["dropped_too_long"] == 1 and result.stats["truncated"] == 0
    assert result.stats["input_truncated"] == 0


def test_an_over_long_input_is_cut_in_its_middle_and_the_row_kept(tmp_path, tokenizer):
    """The use case's inputs run to tens of thousands of characters: truncating keeps the instruction, the start
    and end of the input and the whole answer, instead of dropping the row."""
    record = "脉细数，舌红少苔。" * 400  # a long case record
    rows = [{"instruction": f"根据病历辨证 {i}", "input": f"开头{i}：{record}结尾{i}。", "output": "肺阴虚证，治宜滋阴润肺。"}
            for i in range(4)] + alpaca_rows(4)
    result, train, evaluation = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "case.jsonl", rows),
                                     max_length=256, persona="P.")
    assert result.stats["dropped_too_long"] == 0 and result.stats["input_truncated"] == 4
    assert "input_truncated" in result.summary_markdown
    cut = [row for row in train + evaluation if "[input shortened]" in row["prompt"]]
    assert len(cut) == 4
    for row in cut:
        index = row["prompt"].split("根据病历辨证 ")[1].split()[0]
        assert f"开头{index}" in row["prompt"] and f"结尾{index}" in row["prompt"]  # start and end kept
        assert row["length"] <= 256 and row["input_ids"][-1] == tokenizer.eos_token_id  # the whole answer
        assert tokenizer.decode(answer_tokens(row)) == "肺阴虚证，治宜滋阴润肺。" + tokenizer.eos_token
        assert prompt_tokens(row) == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    result, _, _ = prep(tmp_path / "drop", tokenizer, write_jsonl(tmp_path / "case.jsonl", rows), max_length=256,
                        persona="P.", length_policy="drop")
    assert result.stats["dropped_too_long"] == 4 and result.stats["input_truncated"] == 0


def test_completion_mask_covers_answer_and_eos(tmp_path, tokenizer):
    _, train, evaluation = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "m.jsonl", alpaca_rows()))
    for row in train + evaluation:
        assert len(row["completion_mask"]) == len(row["input_ids"]) == row["length"]
        assert row["completion_mask"] == sorted(row["completion_mask"])  # 0...0 1...1
        assert tokenizer.decode(answer_tokens(row)) == row["completion"] + tokenizer.eos_token
        assert row["input_ids"][-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- sampling


def test_max_samples_and_split_are_seeded(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "many.jsonl", alpaca_rows(60))

    def split(**settings):
        _, train, evaluation = prep(tmp_path, tokenizer, path, **settings)
        return [r["completion"] for r in train], [r["completion"] for r in evaluation]

    first = split(seed=7, max_samples=40, eval_fraction=0.25)
    assert first == split(seed=7, max_samples=40, eval_fraction=0.25)
    assert first != split(seed=8, max_samples=40, eval_fraction=0.25)
    train, evaluation = first
    assert (len(train), len(evaluation)) == (30, 10) and not set(train) & set(evaluation)
    train, evaluation = split(eval_fraction=0.5, max_eval_samples=5)
    assert (len(train), len(evaluation)) == (55, 5)
    train, evaluation = split(eval_fraction=0.01)
    assert len(evaluation) == 1 and len(train) == 59


def test_worker_processes_give_the_same_output(tmp_path, tokenizer):
    rows = [{"instruction": f"Q{i}", "output": f"A{i % 1500}"} for i in range(2100)]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    one = prep(tmp_path, tokenizer, path, num_proc=1)[1]
    two = prep(tmp_path, tokenizer, path, num_proc=2)[1]
    assert one == two


# ---------------------------------------------------------------------------------------------- errors


def test_missing_column_lists_the_columns_found(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "久咳", "reply": "润肺"}])
    with pytest.raises(KubetuneError) as error:
        prep(tmp_path, tokenizer, path)
    message = str(error.value)
    assert "instruction, reply" in message and "columns=output=..." in message

    path = write_jsonl(tmp_path / "y.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(KubetuneError, match="columns found: foo, bar"):
        prep(tmp_path, tokenizer, path)
    with pytest.raises(KubetuneError, match="looked for nope"):
        prep(tmp_path, tokenizer, path, output_column="nope", instruction_column="foo")


def test_malformed_jsonl_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in alpaca_rows(4)]
    lines.insert(2, '{"instruction": "久咳", "output": "润肺",}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(KubetuneError, match=r"bad\.jsonl: line 3 is not valid JSON") as error:
        prep(tmp_path, tokenizer, path)
    assert "Fix:" in str(error.value)
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_wrong_type_names_column_row_and_type(tmp_path, tokenizer):
    rows = alpaca_rows(4)
    rows[2]["output"] = 42
    with pytest.raises(KubetuneError, match=r"'output' holds a number at row 2 \(.*line 3\)"):
        prep(tmp_path, tokenizer, write_jsonl(tmp_path / "n.jsonl", rows))

    rows = [{"messages": "hello", "x": 1}]
    with pytest.raises(KubetuneError, match=r"'messages' at row 0 .* holds a string"):
        prep(tmp_path, tokenizer, write_jsonl(tmp_path / "m.jsonl", rows))
    rows = [{"messages": [{"role": "user", "text": "hi"}]}]
    with pytest.raises(
        KubetuneError, match=r"message 0 has role a string and content missing \(keys: role, text\)"
    ):
        prep(tmp_path, tokenizer, write_jsonl(tmp_path / "m2.jsonl", rows))

    table = pa.table({"instruction": ["a", "b"], "output": [[1, 2], [3]]})
    pq.write_table(table, tmp_path / "lists.parquet")
    with pytest.raises(KubetuneError, match=r"'output' holds lists .* at row 0; expected text"):
        prep(tmp_path, tokenizer, tmp_path / "lists.parquet")


def test_empty_after_cleaning_reports_each_rule(tmp_path, tokenizer):
    rows = [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "长" * 500}]
    rows.append(dict(rows[1]))
    with pytest.raises(KubetuneError) as error:
        prep(
            tmp_path, tokenizer, write_jsonl(tmp_path / "e.jsonl", rows), max_length=32, length_policy="drop"
        )
    message = str(error.value)
    assert "3 rows in, 1 with an empty answer, 1 duplicates, 1 longer than max_length=32" in message
    assert "raise max_length" in message and "length_policy=truncate" in message


def test_unknown_path_and_uri_scheme(tmp_path, tokenizer):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(KubetuneError) as error:
        prep(tmp_path, tokenizer, missing)
    message = str(error.value)
    assert str(missing) in message and "neither an existing file or folder nor a URI" in message
    assert "hub id" in message and "s3://" in message

    with pytest.raises(KubetuneError, match=r"unknown URI scheme foo://") as error:
        prep(tmp_path, tokenizer, "foo://bucket/data.jsonl")
    assert "gs://" in str(error.value)
    with pytest.raises(KubetuneError, match="kubetune://tcm-demo"):
        prep(tmp_path, tokenizer, "kubetune://nope")


def test_cloud_uri_without_its_package_names_it(tmp_path, tokenizer):
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401

        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    with pytest.raises(KubetuneError, match=r"s3fs.*\n.*kubetune\[cloud\]"):
        prep(tmp_path, tokenizer, "s3://bucket/data.jsonl")


def test_folder_errors(tmp_path, tokenizer):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", alpaca_rows(2))
    pq.write_table(pa.Table.from_pylist(alpaca_rows(2)), folder / "b.parquet")
    with pytest.raises(KubetuneError, match="mixes data file types"):
        prep(tmp_path, tokenizer, folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KubetuneError, match="holds no data files"):
        prep(tmp_path, tokenizer, empty)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_eval_fraction_outside_unit_interval(tmp_path, tokenizer, fraction):
    with pytest.raises(KubetuneError, match=r"eval_fraction=.* is outside \(0, 1\)"):
        prep(tmp_path, tokenizer, "kubetune://tcm-demo", eval_fraction=fraction)


def test_empty_file(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(KubetuneError, match="has no rows"):
        prep(tmp_path, tokenizer, tmp_path / "empty.jsonl")


def test_fewer_than_two_rows(tmp_path, tokenizer):
    with pytest.raises(KubetuneError, match="need at least 2"):
        prep(tmp_path, tokenizer, write_jsonl(tmp_path / "one.jsonl", alpaca_rows(1)))


def test_load_prepared_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(KubetuneError, match="does not exist"):
        load_prepared(str(tmp_path / "none.parquet"))
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(KubetuneError, match="not a prepared dataset"):
        load_prepared(str(tmp_path / "other.parquet"))


# ---------------------------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_hundred_thousand_rows(tmp_path, tokenizer):
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(100_000):
            row = {"instruction": f"久咳不愈 {i}", "input": "", "output": f"滋阴润肺 {i % 90_000}", "id": i}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    result, _, evaluation = prep(tmp_path, tokenizer, path, persona="TCM expert.", max_length=64)
    stats = result.stats
    assert stats["rows_in"] == 100_000 and stats["rows_kept"] == 100_000
    assert stats["eval_rows"] == len(evaluation) == 200
    assert stats["rows_per_s"] > 0


def test_a_hub_dataset_subset_is_read(tmp_path):
    """``dataset_subset`` is the configuration name ``load_dataset(id, name)`` takes (the seed's glue/mrpc). A
    repository laid out as on the hub (configs declared in its README), read through the hub-id path."""
    from kubetune.data.reading import read_raw
    from kubetune.data.sources import Source

    repo = tmp_path / "org-tcm"
    for config_name, answer in (("herbs", "桂枝"), ("formulas", "桂枝汤")):
        (repo / config_name).mkdir(parents=True)
        write_jsonl(repo / config_name / "train.jsonl", [{"instruction": f"{config_name}?", "output": answer}] * 3)
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: herbs\n  data_files:\n  - split: train\n    path: herbs/train.jsonl\n"
        "- config_name: formulas\n  data_files:\n  - split: train\n    path: formulas/train.jsonl\n---\n",
        encoding="utf-8")
    source = Source(str(repo), hub_id=str(repo))
    for config_name, answer in (("herbs", "桂枝"), ("formulas", "桂枝汤")):
        config = DataConfig(dataset=str(repo), dataset_subset=config_name)
        rows, _ = read_raw(source, config, str(tmp_path / "scratch"))
        assert set(rows["output"]) == {answer}
    with pytest.raises(KubetuneError, match=r"subset 'missing', split 'train'.*(?s:.*)dataset_subset"):
        read_raw(source, DataConfig(dataset=str(repo), dataset_subset="missing"), str(tmp_path / "scratch"))
