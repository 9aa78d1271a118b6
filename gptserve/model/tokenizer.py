"""GPT-2's byte-level BPE as a tiktoken Encoding, built offline from a model folder.

Hugging Face folders carry `vocab.json` (token string -> id, in GPT-2's printable
byte alphabet) and `merges.txt` (merge priority). tiktoken ranks tokens by merge
priority; for GPT-2 the ids already are those ranks, which we check against merges.txt.
Nothing here downloads anything.
"""
from __future__ import annotations

import codecs
import json
from functools import lru_cache
from pathlib import Path

import tiktoken

ENDOFTEXT = "<|endoftext|>"
# GPT-2's split pattern (tiktoken's r50k_pat_str)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(ValueError):
    pass


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's map from printable stand-in characters back to raw bytes."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


class Tokenizer:
    """Encode/decode text; `eos_token_id` is `<|endoftext|>`."""

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.eos_token_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        return _load(str(Path(folder).resolve()))

    @property
    def special_tokens(self) -> set[str]:
        return set(self.encoding.special_tokens_set)

    def encode(self, text: str, allowed_special: set[str] | frozenset[str] = frozenset()) -> list[int]:
        """Special tokens written in text stay plain text, as in the OpenAI API, except those
        in `allowed_special` (tiktoken's name), which become their own token."""
        if not allowed_special:
            return self.encoding.encode_ordinary(text)
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def token_str(self, token_id: int) -> str:
        """The token as text, broken UTF-8 shown as U+FFFD (for logprobs and /tokenize)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a stream of token ids into text that never splits a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@lru_cache(maxsize=8)
def _load(folder: str) -> Tokenizer:
    path = Path(folder)
    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise TokenizerError(f"{path} has no {f.name}: a GPT-2 model folder needs vocab.json and merges.txt")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{vocab_file} is not valid JSON: {e}") from None
    alphabet = _byte_alphabet()
    specials: dict[str, int] = {}
    ranks: dict[bytes, int] = {}
    for token, idx in vocab.items():
        if token.startswith("<|") and token.endswith("|>"):
            specials[token] = idx
            continue
        try:
            ranks[bytes(alphabet[c] for c in token)] = idx
        except KeyError:
            raise TokenizerError(f"{vocab_file}: token {token!r} is not in GPT-2's byte alphabet") from None
    _check_merges(merges_file, ranks, alphabet)
    if ENDOFTEXT not in specials:
        raise TokenizerError(f"{vocab_file} has no {ENDOFTEXT} token")
    encoding = tiktoken.Encoding(
        name=f"gpt2:{folder}",
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )
    return Tokenizer(encoding)


def _check_merges(merges_file: Path, ranks: dict[bytes, int], alphabet: dict[str, int]) -> None:
    """tiktoken merges by rank; the ids must follow merges.txt's order, as in GPT-2."""
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [ln.split() for ln in lines[1:] if ln.strip()]
    n_single = 256
    for i, pair in enumerate(merges):
        if len(pair) != 2:
            raise TokenizerError(f"{merges_file}: line {i + 2} is not a merge pair")
        merged = bytes(alphabet[c] for c in pair[0] + pair[1])
        if ranks.get(merged) != n_single + i:
            raise TokenizerError(
                f"{merges_file}: merge {i + 2} does not match vocab.json's ids; "
                "this is not a GPT-2 byte-level BPE tokenizer"
            )
