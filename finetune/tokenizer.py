"""Character tokenizer for CTC: the characters of the training transcripts, ``|`` between words,
the blank at index 0 (fairseq's letter targets, Hugging Face's ``Wav2Vec2CTCTokenizer`` layout).

    tokenizer = CharTokenizer.build(transcripts)        # vocab: <blank>, <unk>, |, then the characters
    ids = tokenizer.encode("HELLO WORLD")               # [.., 2 (|), ..]
    tokenizer.decode(ids) == "HELLO WORLD"

Text is normalised before encoding (``case``: ``upper``, ``lower`` or ``keep``; runs of whitespace
become one word boundary). Characters not in the vocabulary map to ``<unk>`` and are counted in
``unknown``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BLANK, UNK, WORD = "<blank>", "<unk>", "|"


@dataclass
class CharTokenizer:
    vocab: list[str]
    case: str = "upper"
    unknown: Counter = field(default_factory=Counter, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.vocab[:3] != [BLANK, UNK, WORD]:
            raise ValueError(f"a character vocabulary starts with {BLANK}, {UNK}, {WORD}; got {self.vocab[:3]}")
        if self.case not in ("upper", "lower", "keep"):
            raise ValueError(f"case must be upper, lower or keep, got {self.case!r}")
        self.index = {token: i for i, token in enumerate(self.vocab)}

    blank = 0

    @classmethod
    def build(cls, transcripts: Iterable[str], case: str = "upper") -> CharTokenizer:
        """The vocabulary of ``transcripts``: the special tokens, then their characters sorted."""
        probe = cls([BLANK, UNK, WORD], case)
        chars = {c for text in transcripts for c in probe.normalize(text) if c != WORD}
        if not chars:
            raise ValueError("no characters in the transcripts: is the text field empty?")
        return cls([BLANK, UNK, WORD, *sorted(chars)], case)

    def normalize(self, text: str) -> str:
        """Case folded, words joined by ``|``: ``" Hello  world "`` -> ``"HELLO|WORLD"``."""
        text = text.upper() if self.case == "upper" else text.lower() if self.case == "lower" else text
        return WORD.join(text.replace(WORD, " ").split())

    def encode(self, text: str) -> list[int]:
        ids = []
        for c in self.normalize(text):
            i = self.index.get(c)
            if i is None:
                self.unknown[c] += 1
                i = 1
            ids.append(i)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids (blanks and CTC repeats already removed) to text, ``|`` back to spaces."""
        return " ".join(word for word in "".join(self.vocab[i] for i in ids if i > 0).split(WORD) if word)

    def __len__(self) -> int:
        return len(self.vocab)

    def to_dict(self) -> dict:
        return {"type": "char", "vocab": self.vocab, "case": self.case}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        if data.get("type") != "char":
            raise ValueError(f"not a character tokenizer: type {data.get('type')!r}")
        return cls(list(data["vocab"]), data.get("case", "upper"))
