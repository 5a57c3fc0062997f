"""Shapes shared by every benchmark: one place, with the real size beside each shrunk value.

Qwen2.5-VL-7B-Instruct's language model (and Pangea-7B's Qwen2-7B): hidden 3584,
intermediate 18944, 28 decoder layers, 28 attention heads over 4 key/value heads, vocabulary
152064, SiLU. CVQA prompts with an image run to ~1-2k tokens, so a batch carries 2048 to 8192
tokens; 25 culture groups. Decoding (``generate()`` under ablation) runs one token per row:
8 rows is a decode-size call.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    name: str
    hidden: int  # H
    intermediate: int  # N, neurons per layer
    layers: int  # L
    tokens: tuple[int, ...]  # R per forward (flattened batch x sequence)
    cultures: int  # C
    heads: int = 28  # attention heads
    kv_heads: int = 4  # key/value heads (grouped-query attention)
    vocab: int = 152064
    prefill: tuple[int, int] = (4, 512)  # (B, T) of a prompt batch through the whole model
    decode_rows: int = 8  # B of a decode-size call (T = 1)
    act_fn: str = "silu"


QWEN25_VL_7B = DecoderShape("qwen2.5-vl-7b", hidden=3584, intermediate=18944, layers=28,
                            tokens=(2048, 8192), cultures=25)

# For --quick runs on a CPU: same code paths, shapes small enough for seconds.
TINY = DecoderShape("tiny", hidden=64,  # real 3584
                    intermediate=160,  # real 18944
                    layers=2,  # real 28
                    tokens=(64, 200),  # real 2048, 8192
                    cultures=25,
                    heads=4,  # real 28
                    kv_heads=2,  # real 4
                    vocab=512,  # real 152064
                    prefill=(2, 32),  # real (4, 512)
                    decode_rows=8)  # fmt: skip
