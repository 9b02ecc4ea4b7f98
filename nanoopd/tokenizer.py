"""
A tiktoken Encoding built entirely in code: no download, no network, ever.

"bytes", the project's tokenizer: the ranks are the 256 single bytes (byte-level, so any text
round-trips), with no merges: on synthetic math a byte is already the natural unit, and the split
pattern below keeps every digit a piece of its own so that merges added later could never fuse
digits. Special tokens follow the bytes. Plain-text input that spells a special token is refused
(tiktoken's own default), so a user string can never inject `<|eos|>` or a privileged-information
marker.

"digits", another tokenizer of the same texts (a teacher that reads numbers otherwise): a run of
digits splits into pieces of up to three from the left, and every 2- and 3-digit string is one
token (ranks after the bytes, 2-digit ones first, so that BPE reaches every 3-digit one). "347" is
one token, "3471" two ("347", "1"); everything else is read as "bytes" reads it.
"""

import tiktoken

# pieces: a special token | one digit | a run of letters | a run of other symbols | whitespace
SPLIT_PATTERN = r"""<\|[a-z_]+\|>|\p{N}|\p{L}+|[^\s\p{L}\p{N}]+|\s+"""

DIGIT_RUN_PATTERN = SPLIT_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|")  # "digits": up to three digits a piece

SPECIAL_TOKENS = [
    "<|bos|>",  # start of every sequence
    "<|eos|>",  # end of a response; the sampler stops on it
    "<|pad|>",  # filler for ragged batches (never attended to, never trained on)
    "<|pi|>",   # opens a block of privileged information / a shared rule (self-distillation)
    "<|fmt|>",  # a format token only some models are trained to emit (special-token mismatch, M2)
]


def digit_strings() -> list[bytes]:
    """Every 2-digit string, then every 3-digit one: the merges of "digits", in rank order."""
    return [str(n).zfill(k).encode() for k in (2, 3) for n in range(10 ** k)]


TOKENIZERS = {  # name -> (split pattern, merged pieces after the 256 bytes)
    "bytes": (SPLIT_PATTERN, []),
    "digits": (DIGIT_RUN_PATTERN, digit_strings()),
}


class Tokenizer:
    """Thin wrapper around a `tiktoken.Encoding` with byte ranks (and the named tokenizer's merges)
    and the special tokens above, which follow them."""

    def __init__(self, name: str = "bytes"):
        if name not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {name!r}; the known ones: {', '.join(TOKENIZERS)}")
        pattern, merges = TOKENIZERS[name]
        ranks = {bytes([i]): i for i in range(256)}
        ranks.update({m: 256 + i for i, m in enumerate(merges)})
        specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.name = name
        self.enc = tiktoken.Encoding(
            name=f"nanoopd_{name}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.bos_id = specials["<|bos|>"]
        self.eos_id = specials["<|eos|>"]
        self.pad_id = specials["<|pad|>"]
        self.pi_id = specials["<|pi|>"]
        self.fmt_id = specials["<|fmt|>"]
        self.special_ids = dict(specials)

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. A special token spelled in `text` raises ValueError unless allow_special."""
        allowed = "all" if allow_special else set()
        return self.enc.encode(text, allowed_special=allowed, disallowed_special="all")

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.enc.decode(ids, errors="replace")


_TOKENIZERS = {}


def get_tokenizer(name: str = "bytes") -> Tokenizer:
    """The tokenizer `name` (built once per process); "bytes" is the one every model of the
    project shares."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = Tokenizer(name)
    return _TOKENIZERS[name]
