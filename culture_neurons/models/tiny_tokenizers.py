"""The tiny models' tokenizers (:mod:`culture_neurons.models.tiny`): byte-level BPE trained in
code on a small corpus (so any text tokenizes, nothing is downloaded), each family's special
tokens (:class:`TokenizerSpec`) and its chat template, close to the real one."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BASE_VOCAB = 400  # trained BPE merges + 256 bytes; real Qwen2 151643, Llama 32000, Gemma 262144

_WORDS = (
    "the a an of and to in on is are was with for from by at as it this that these those what "
    "which who whom where when why how not no yes or if than then there here one two three four "
    "five image picture photo shows shown show see seen look dish food drink fruit bread rice "
    "soup tea coffee festival dance music song instrument dress clothing hat country city town "
    "village river lake sea mountain temple church mosque market street building house bridge "
    "flag animal bird tree flower color red blue green yellow black white people person man "
    "woman child family game sport ball holiday new year name called traditional famous local "
    "region culture language answer letter option options question choose correct following "
    "best describes please only directly given choices you are helpful assistant user system"
).split()
_SYMBOLS = "A B C D E 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ( ) [ ] ' \" - / % & + = * #"


def corpus() -> list[str]:
    """Sentences that give the BPE trainer enough merges for ~BASE_VOCAB tokens."""
    n = len(_WORDS)
    lines = [" ".join(_WORDS[(i * 7 + j) % n] for j in range(12)) for i in range(n)]
    lines += [w.capitalize() + "?" for w in _WORDS]
    lines += [f"{'ABCD'[i % 4]}. {w}" for i, w in enumerate(_WORDS)]
    lines.append(_SYMBOLS)
    # Frequent enough that " A".." D" and "A".."D" each end up one token, as in real vocabularies
    # (the answer letter is scored from the next-token logits of these ids).
    lines += [f"Answer: {x}. The answer is {x}\n{x}" for x in "ABCD" for _ in range(20)]
    return lines


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens of one family. `head` take ids 0.. (sentencepiece vocabularies put
    <unk>/<s>/<pad> there); `tail` are appended after the trained vocabulary, where real
    checkpoints add image and chat tokens (LLaVA <image> = 32000, Qwen <|image_pad|> = 151655)."""

    head: tuple[str, ...]
    tail: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    unk: str | None = None
    add_bos: bool = False  # the tokenizer itself prepends bos (Llama / Mistral sentencepiece)
    extra: tuple[tuple[str, str], ...] = ()  # named special tokens: tokenizer.<name>(_id)


_LLAMA_HEAD = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama-2 / Mistral
_QWEN_CHAT = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen2: 151643, 151644, 151645
_QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_GEMMA_IMAGE = (
    ("boi_token", "<start_of_image>"),
    ("eoi_token", "<end_of_image>"),
    ("image_token", "<image_soft_token>"),
)  # Gemma3: 255999, 256000, 262144

TOKENIZERS: dict[str, TokenizerSpec] = {
    "qwen": TokenizerSpec(
        (),
        _QWEN_CHAT + _QWEN_VISION,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=(("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>")),
    ),
    "qwen_text": TokenizerSpec((), _QWEN_CHAT, eos="<|im_end|>", pad="<|endoftext|>"),
    # Pangea-7B-hf: Qwen2 vocabulary plus <image> (151646).
    "qwen_llava": TokenizerSpec(
        (),
        _QWEN_CHAT + ("<image>",),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=(("image_token", "<image>"),),
    ),
    # LLaVA-1.5 / 1.6-Mistral hf: <image> = 32000, <pad> = 32001.
    "llama_llava": TokenizerSpec(
        _LLAMA_HEAD,
        ("<image>", "<pad>"),
        eos="</s>",
        pad="<pad>",
        bos="<s>",
        unk="<unk>",
        add_bos=True,
        extra=(("image_token", "<image>"),),
    ),
    # Llama-2 / Mistral have no pad token; batching code commonly pads with <unk>.
    "llama_text": TokenizerSpec(
        _LLAMA_HEAD, (), eos="</s>", pad="<unk>", bos="<s>", unk="<unk>", add_bos=True
    ),
    # Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3, turn markers 105/106; the template writes bos.
    "gemma": TokenizerSpec(
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        tuple(tok for _, tok in _GEMMA_IMAGE),
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        unk="<unk>",
        extra=_GEMMA_IMAGE,
    ),
}


@functools.cache  # lru_cache without a bound
def _trained_backend(head: tuple[str, ...]) -> str:
    """Train once per head-token set; return the tokenizers JSON (wrapped fresh per call, so a
    caller changing padding_side or adding tokens never leaks into another test)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB + len(head),
        special_tokens=list(head),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no text is unknown
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def build_tokenizer(spec: TokenizerSpec, chat_template: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(_trained_backend(spec.head))
    tok.add_special_tokens(list(spec.tail))
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        extra_special_tokens=dict(spec.extra),
        chat_template=chat_template,
        padding_side="right",
    )


# ----------------------------------------------------------------------------------------------
# Chat templates, close to the real ones. Content may be a string or a list of text/image parts.
# ----------------------------------------------------------------------------------------------
def _content(image: str) -> str:
    """Jinja rendering message `m`'s content, writing `image` at each image part. Literal text
    sits inside {{ '...' }} because transformers renders with trim_blocks, which would eat a
    newline written right after a {% tag %}."""
    return (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    )


def chatml(image: str = "") -> str:
    """Qwen2 / Qwen2-VL / Qwen2.5-VL / Pangea: chatml with the default system prompt."""
    return (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' }}" + _content(image) + "{{ '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def vicuna(image: str) -> str:
    """LLaVA-1.5: `USER: <image>\\n... ASSISTANT:` (bos comes from the tokenizer)."""
    return (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}"
        "{% endif %}" + _content(image) + "{{ ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


def inst(image: str = "") -> str:
    """Mistral-Instruct / LLaVA-1.6-Mistral / Llama-2-chat: `[INST] <image>\\n... [/INST]`."""
    return (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' ' }}"
        + _content("")
        + "{{ eos_token }}{% elif m['role'] == 'system' %}"
        + _content("")
        + "{{ '\n\n' }}"
        "{% else %}{{ '[INST] ' }}" + _content(image) + "{{ ' [/INST]' }}{% endif %}{% endfor %}"
    )


def gemma(image: str = "") -> str:
    """Gemma 3: turns with role `model` for the assistant; the template writes bos. A system
    message becomes its own user turn (the real template folds it into the first one)."""
    return (
        "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + "
        "('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
        + _content(image)
        + "{{ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
