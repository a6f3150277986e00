"""Tokenizers behind one small interface: encode / decode / bos_id / eos_id / pad_id / vocab_size.

`ByteTokenizer` (bytes + 3 specials) serves the built-in tiny model; a checkpoint's own tokenizer
is wrapped by `HFTokenizer`.
"""
from __future__ import annotations

from pathlib import Path

from lemix.engine.checkpoint import has_tokenizer_files


class ByteTokenizer:
    """ids 0..255 are bytes; BOS=256, EOS=257, PAD=258."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer wrapped to the ByteTokenizer interface."""

    def __init__(self, tok):
        self._tok = tok
        self.bos_id: int | None = tok.bos_token_id
        self.eos_id: int | None = tok.eos_token_id
        # Many checkpoints have no pad token; padding positions are masked anyway, so EOS will do.
        self.pad_id: int | None = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.vocab_size: int = len(tok)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False))
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | Path | None, vocab_size: int) -> ByteTokenizer | HFTokenizer:
    """The checkpoint's tokenizer when `path` holds tokenizer files, else the byte tokenizer.

    The byte fallback needs a model vocabulary of at least 259 ids (bytes + BOS/EOS/PAD).
    """
    if path is not None and has_tokenizer_files(path):
        from transformers import AutoTokenizer
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    if vocab_size >= ByteTokenizer.vocab_size:
        return ByteTokenizer()
    where = f"no tokenizer files in {path}" if path is not None else "no tokenizer given"
    raise ValueError(f"{where}, and the byte-level fallback needs vocab_size >= "
                     f"{ByteTokenizer.vocab_size} but the model has {vocab_size}")


def _byte_chars() -> list[str]:
    """One printable character per byte value, the byte-level BPE convention: printable Latin-1
    bytes stand for themselves, the others are shifted to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def hf_byte_tokenizer():
    """ByteTokenizer as a Hugging Face fast tokenizer with the same ids (bytes 0..255, BOS 256,
    EOS 257, PAD 258), so an exported built-in model loads with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    ids = [fast.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>")]
    if ids != [ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.pad_id]:
        raise RuntimeError(f"byte tokenizer specials got ids {ids}")
    return fast
