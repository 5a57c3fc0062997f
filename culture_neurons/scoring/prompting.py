"""Multiple-choice prompts: an item becomes chat-template text (+ image) and a padded batch.

The question layout is the usual lettered form, the same for every family; what differs per
family (message structure, image placeholder) comes from the adapter and the processor's own
chat template, so the model sees exactly the prompt format it was tuned on.
"""

from __future__ import annotations

import re
import warnings

import torch

from culture_neurons.errors import UsageError
from culture_neurons.models import adapters

LETTERS = "ABCD"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def question_text(question: str, options: tuple[str, ...] | list[str]) -> str:
    lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines + [INSTRUCTION])


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def render(model, processor, item) -> str:
    """The chat-template text of one item, ending with the assistant's generation prompt."""
    adapter = adapters.get_adapter(model)
    body = question_text(item.question, item.options)
    messages = adapter.messages(body)
    if not adapter.vlm:  # text-only chat templates expect a plain string
        messages = [{"role": "user", "content": body}]
    if getattr(tokenizer_of(processor), "chat_template", None) is None and not getattr(
        processor, "chat_template", None
    ):
        raise UsageError(
            f"{type(processor).__name__} has no chat template; use the model's instruct "
            "processor (e.g. the '-Instruct' checkpoint), which ships one"
        )
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_lengths(model, processor, items) -> list[int]:
    """Tokens of each item's prompt as :func:`encode` gives them, padding aside.

    No image is processed where the family allows it (every supported one by default): the
    chat-template text is tokenized with the image placeholder expanded for the image's size,
    read from its header (:func:`culture_neurons.models.adapters.expanded_prompts`). That costs
    the template, one batched tokenizer call and a header read per item: ~0.1 ms each on a CPU,
    against the milliseconds of resizing and normalising the pixels. Where the processor cannot
    count image tokens from the size, it runs per item on the real image (exact, at that
    cost; one warning says so).
    """
    texts = [render(model, processor, it) for it in items]
    tok = tokenizer_of(processor)
    if adapters.get_adapter(model).vlm:
        sizes = [it.image_size for it in items]
        expanded = adapters.expanded_prompts(model, processor, texts, sizes)
        if expanded is None:
            global _WARNED_LENGTHS
            if not _WARNED_LENGTHS:
                warnings.warn(f"{type(processor).__name__} cannot count image tokens from an "
                              "image's size: prompt lengths (for batching by length) run the "
                              "processor on every image once more", stacklevel=2)  # fmt: skip
                _WARNED_LENGTHS = True
            return [int(encode(model, processor, [it])["input_ids"].shape[1]) for it in items]
        texts = expanded
    return [len(ids) for ids in tok(texts)["input_ids"]]


_WARNED_LENGTHS = False


def encode(model, processor, items, device=None) -> dict:
    """A left-padded batch (the answer position is the last column for every row)."""
    texts = [render(model, processor, it) for it in items]
    tok = tokenizer_of(processor)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        if adapters.get_adapter(model).vlm:
            images = [[it.image] for it in items]
            batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        else:
            batch = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    batch = dict(batch)
    if device is not None:
        dtype = next(model.parameters()).dtype
        batch = {
            k: v.to(device, dtype=dtype if v.is_floating_point() else None)
            if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }  # fmt: skip
    return batch


def letter_token_ids(processor) -> list[list[int]]:
    """Per letter A-D, the token ids that can start the answer (``"A"`` and ``" A"``).

    A letter scores as the best of its ids: tokenizers differ on whether the first answer
    token carries a leading space, and the chat template decides which one follows.
    """
    tok = tokenizer_of(processor)
    out = []
    for letter in LETTERS:
        ids = set()
        for text in (letter, " " + letter):
            enc = tok.encode(text, add_special_tokens=False)
            if enc and tok.decode(enc[-1:]).strip() == letter:
                ids.add(enc[-1])
        if not ids:
            raise UsageError(f"the tokenizer has no single token for the option letter {letter!r}")
        out.append(sorted(ids))
    return out


_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


def parse_letter(text: str) -> int:
    """Index 0-3 of the first standalone option letter in generated text, -1 if none."""
    m = _LETTER.search(text)
    return LETTERS.index(m.group(1)) if m else -1
