"""Shapes shared by every benchmark: one place, with the real size beside each shrunk value.

Qwen2.5-VL-7B-Instruct's language model (and Pangea-7B's Qwen2-7B): hidden 3584,
intermediate 18944, 28 decoder layers, SiLU. CVQA prompts with an image run to ~1-2k tokens, so
a batch carries 2048 to 8192 tokens; 25 culture groups.
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
    act_fn: str = "silu"


QWEN25_VL_7B = DecoderShape("qwen2.5-vl-7b", hidden=3584, intermediate=18944, layers=28,
                            tokens=(2048, 8192), cultures=25)

# For --quick runs on a CPU: same code paths, shapes small enough for seconds.
TINY = DecoderShape("tiny", hidden=64,  # real 3584
                    intermediate=160,  # real 18944
                    layers=2,  # real 28
                    tokens=(64, 200),  # real 2048, 8192
                    cultures=25)  # fmt: skip
