"""
A tiktoken Encoding built entirely in code: no download, no network, ever.

The ranks are the 256 single bytes (byte-level, so any text round-trips), with no merges: on
synthetic math a byte is already the natural unit, and the split pattern below keeps every digit a
piece of its own so that merges added later could never fuse digits. Special tokens follow the
bytes. Plain-text input that spells a special token is refused (tiktoken's own default), so a user
string can never inject `<|eos|>` or a privileged-information marker.
"""

import tiktoken

# pieces: a special token | one digit | a run of letters | a run of other symbols | whitespace
SPLIT_PATTERN = r"""<\|[a-z_]+\|>|\p{N}|\p{L}+|[^\s\p{L}\p{N}]+|\s+"""

SPECIAL_TOKENS = [
    "<|bos|>",  # start of every sequence
    "<|eos|>",  # end of a response; the sampler stops on it
    "<|pad|>",  # filler for ragged batches (never attended to, never trained on)
    "<|pi|>",   # opens a block of privileged information / a shared rule (self-distillation)
    "<|fmt|>",  # a format token only some models are trained to emit (special-token mismatch, M2)
]


class Tokenizer:
    """Thin wrapper around a `tiktoken.Encoding` with byte ranks and the special tokens above."""

    def __init__(self):
        ranks = {bytes([i]): i for i in range(256)}
        specials = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanoopd_bytes",
            pat_str=SPLIT_PATTERN,
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


_TOKENIZER = None


def get_tokenizer() -> Tokenizer:
    """The one tokenizer every model of the project shares (built once per process)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer()
    return _TOKENIZER
