"""The bundled GPT-2 tokenizer: OpenAI's files, transformers' encodings, lossless streaming decode."""
from __future__ import annotations

import hashlib
import inspect
import shutil

import pytest
import tiktoken_ext.openai_public as openai_public
from transformers import GPT2Tokenizer

from gptserve.model.tokenizer import GPT2_PAT, Tokenizer, TokenizerError
from gptserve.weights.loader import DEFAULT_MODEL_DIR

# sha256 of GPT-2's encoder.json (= vocab.json) and vocab.bpe (= merges.txt), as tiktoken pins them
VOCAB_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_TXT_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

PARAGRAPH = (
    "The quick brown fox didn't jump; it'd rather've slept. We're sure you'll see, they've said.\n"
    "def add(a, b):\n    return a + b  # 2 + 2 == 4\n\n\n"
    "\tTabs\tand    runs   of spaces   \n   \n"
    "Prices: $1,234.56 or 3.14159e-10; IDs 0x7f3A, 2024-06-01T12:00:00Z, v1.2.3-rc4.\n"
    "URLs like https://example.com/a?b=c&d=e#f and emails <x.y@z.org>!!! ... ---\n"
    "CAPS LOCK, MiXeD cAsE, O'Neill's 'quoted' \"double\" `back`   trailing   "
)
UNICODE_TEXTS = [
    "naïve café, Zürich, smörgåsbord, Ελληνικά, русский, עברית, العربية",
    "中文分词测试：你好，世界！GPT-2 能处理汉字吗？",
    "emoji 🙂👍🏽🚀 and ZWJ families 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏿‍💻 flags 🇯🇵🇫🇷",
    "math ∀x∈ℝ: x² ≥ 0 — “quotes” ‘single’ … ½ ⅓ № ™ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_folder(DEFAULT_MODEL_DIR)


def test_hello_world(tokenizer):
    assert tokenizer.encode("hello world") == [31373, 995]
    assert tokenizer.decode([31373, 995]) == "hello world"


def test_endoftext_is_id_50256_and_stays_plain_text_in_user_input(tokenizer):
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.vocab_size == 50257
    assert tokenizer.decode([50256]) == "<|endoftext|>"
    assert tokenizer.encode("<|endoftext|>") != [50256]  # typed by a user, it is just text
    assert tokenizer.decode(tokenizer.encode("<|endoftext|>")) == "<|endoftext|>"


def test_shipped_files_are_openais_gpt2_files(tokenizer):
    digest = {name: hashlib.sha256((DEFAULT_MODEL_DIR / name).read_bytes()).hexdigest()
              for name in ("vocab.json", "merges.txt")}
    assert digest == {"vocab.json": VOCAB_JSON_SHA256, "merges.txt": MERGES_TXT_SHA256}
    pinned = inspect.getsource(openai_public.gpt2)  # the hashes tiktoken publishes
    assert VOCAB_JSON_SHA256 in pinned and MERGES_TXT_SHA256 in pinned


def test_split_pattern_is_tiktokens_gpt2_pattern():
    assert GPT2_PAT == openai_public.r50k_pat_str


def test_encodings_equal_transformers_gpt2_tokenizer(tokenizer):
    # transformers 5 has no pure-Python GPT-2 tokenizer; GPT2Tokenizer is the `tokenizers`
    # BPE, built here offline from the same two files
    ref = GPT2Tokenizer(str(DEFAULT_MODEL_DIR / "vocab.json"), str(DEFAULT_MODEL_DIR / "merges.txt"))
    for text in [PARAGRAPH, *PARAGRAPH.splitlines(keepends=True), *UNICODE_TEXTS]:
        assert tokenizer.encode(text) == ref.encode(text), repr(text)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_unicode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", [PARAGRAPH, *UNICODE_TEXTS])
def test_incremental_decoder_never_emits_a_replacement_char_and_adds_up(tokenizer, text):
    ids = tokenizer.encode(text)
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_token_str_shows_a_partial_utf8_token_as_a_replacement_char(tokenizer):
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1 and "\ufffd" in tokenizer.token_str(ids[0])
    assert tokenizer.token_str(31373) == "hello"


def test_a_folder_without_merges_txt_raises_tokenizer_error(tmp_path):
    shutil.copy(DEFAULT_MODEL_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match="has no merges.txt"):
        Tokenizer.from_folder(tmp_path)
