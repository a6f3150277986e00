"""Text around the token ids: the chat template, training-sample tokens, and the incremental
detokenizer that finds stop strings and decides which text is safe to stream."""
from __future__ import annotations

# The byte model has no chat template of its own; this one is plain and unambiguous.
_ROLE_TAG = {"system": "<|system|>", "developer": "<|system|>", "user": "<|user|>",
             "assistant": "<|assistant|>", "tool": "<|tool|>"}


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt ending where the assistant's reply starts (without
    add_generation_prompt: after the last message): the tokenizer's own chat template when it
    has one, else `<|role|>\\ncontent\\n` blocks and `<|assistant|>\\n`."""
    hf = getattr(tokenizer, "_tok", None)
    if hf is not None and getattr(hf, "chat_template", None):
        ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"{_ROLE_TAG[m['role']]}\n{m['content']}\n" for m in messages)
    return tokenizer.encode(text + ("<|assistant|>\n" if add_generation_prompt else ""))


def sample_tokens(tokenizer, payload: dict, max_tokens: int) -> list[int]:
    """A training sample's ids: BOS + text (+ EOS), or BOS + prompt + completion (+ EOS),
    truncated to max_tokens. The loss covers every token, the prompt's too (the engine trains
    on whole sequences)."""
    if "text" in payload:
        ids = tokenizer.encode(payload["text"])
    else:
        ids = tokenizer.encode(payload["prompt"]) + tokenizer.encode(payload["completion"], add_bos=False)
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids[:max_tokens]


class Detokenizer:
    """Generated ids -> text, one token at a time, honoring stop strings.

    Incremental, as vLLM does it: only the ids since the last complete character are decoded
    (`_p`..end against `_p`..`_r`), so a token costs O(1) decode work, and a token that ends
    inside a multi-byte character adds no text until the character is whole. `push(token)`
    returns the newly safe text; a matched stop string cuts the text before it and sets
    `stopped`. Text whose tail could still become a stop string is held back; `flush()`
    releases the rest at the end.
    """

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._p = self._r = 0      # ids[_p:_r] decode to text already appended

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        prefix = self.tok.decode(self.ids[self._p:self._r])
        new = self.tok.decode(self.ids[self._p:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self._p, self._r = self._r, len(self.ids)
        if self.stops:
            cut = self._find_stop()
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        if not self.stopped:   # whatever is left, incomplete characters included
            prefix = self.tok.decode(self.ids[self._p:self._r])
            self.text += self.tok.decode(self.ids[self._p:])[len(prefix):]
            self._p = self._r = len(self.ids)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def _find_stop(self) -> int | None:
        start = max(0, self.sent - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Characters at the end that must wait: a suffix that is a prefix of a stop string."""
        text, held = self.text, 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held
