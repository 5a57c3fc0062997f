"""Training the toy: the prompts encoded once, the loop, and the accuracy it is judged by
(:func:`culture_neurons.demo.toy.build_toy` calls these; ``python -m culture_neurons.demo.build``
runs the build)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from culture_neurons.data import CultureData, Item, stable_seed
from culture_neurons.models.adapters import act_module, decoder_mlps
from culture_neurons.scoring.multiple_choice import letter_scores, predict
from culture_neurons.scoring.prompting import encode, letter_token_ids

if TYPE_CHECKING:
    from culture_neurons.demo.toy import ToyConfig

log = logging.getLogger("culture_neurons.demo.toy")
class _Encoded:
    """All training prompts encoded once, as evaluation builds them (left-padded, by
    :func:`encode`), with what never changes during training computed once too: the frozen
    vision tower's image embeddings and the 3D rope positions. A minibatch is a row slice; the
    model gets the embeddings as ``mm_encoder_outputs`` and runs only its decoder (on 2 busy
    CPU cores this halves a step)."""

    def __init__(self, model, processor, items: list[Item]):
        batch = encode(model, processor, items)
        self.input_ids, self.attention_mask = batch["input_ids"], batch["attention_mask"]
        self.labels = torch.tensor([it.label for it in items])
        inner = model.model
        with torch.no_grad():
            vision = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            self.position_ids, _ = inner.get_rope_index(
                self.input_ids,
                image_grid_thw=batch["image_grid_thw"],
                attention_mask=self.attention_mask,
                mm_token_type_ids=batch["mm_token_type_ids"],
            )  # [3, rows, T]
        self.image_embeds = [e.detach() for e in vision.pooler_output]  # per row [tokens, H]

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Model inputs and labels of rows ``index``; leading all-padding columns dropped."""
        mask = self.attention_mask[index]
        first = int(mask.any(dim=0).nonzero()[0, 0])
        image = BaseModelOutputWithPooling(
            pooler_output=tuple(self.image_embeds[i] for i in index.tolist())
        )
        inputs = {
            "input_ids": self.input_ids[index, first:],
            "attention_mask": mask[:, first:],
            "position_ids": self.position_ids[:, index, first:],
            "mm_encoder_outputs": {"image": image},
        }
        return inputs, self.labels[index]


def train(model, processor, items: list[Item], config: ToyConfig, seed: int) -> list[float]:
    """Train ``model`` in place on ``items``; return the loss of every step.

    Loss: cross-entropy over the four option-letter scores (the evaluator's
    :func:`letter_scores`) of the next-token logits at each of the last
    ``config.answer_positions`` prompt positions (averaged; the logged loss is the answer
    position's), plus ``config.firing_penalty`` x the mean ``relu(gate_proj(x))`` (see
    :class:`_GateRecorder`). AdamW, linear warmup then cosine decay; minibatch order from a
    generator seeded with ``seed``. The vision tower is frozen, and so are the token
    embeddings if ``config.freeze_embeddings``.
    """
    encoded = _Encoded(model, processor, items)
    letters = letter_token_ids(processor)
    model.model.visual.requires_grad_(False)  # its outputs are cached in `encoded`
    if config.freeze_embeddings:  # word meanings must be computed by the decoder (toy.py doc)
        model.get_input_embeddings().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    gen = torch.Generator().manual_seed(stable_seed("toy-batches", seed) % (2**31))
    losses: list[float] = []
    gates = _GateRecorder(model) if config.firing_penalty else None
    model.train()
    try:
        _steps(model, encoded, letters, optimizer, schedule, gen, gates, config, seed, losses)
    finally:
        if gates is not None:
            gates.remove()
        model.requires_grad_(True)
        model.eval()
    return losses


def _steps(model, encoded, letters, optimizer, schedule, gen, gates, config, seed, losses):
    """The training loop of :func:`train` (appends each step's answer-position loss)."""
    order, cursor = torch.randperm(len(encoded), generator=gen), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout, if a config enables it
        for step in range(config.steps):
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(encoded), generator=gen), 0
            batch, labels = encoded.rows(order[cursor : cursor + config.batch_size])
            cursor += config.batch_size
            k = config.answer_positions
            logits = model(**batch, logits_to_keep=k).logits  # [rows, k, vocab]
            scores = letter_scores(logits.reshape(-1, logits.shape[-1]), letters)
            per_position = F.cross_entropy(scores, labels.repeat_interleave(k), reduction="none")
            loss = per_position.view(-1, k)[:, -1].mean()  # the answer position: what is logged
            objective = per_position.mean()
            if gates is not None:
                objective = objective + config.firing_penalty * gates.firing(batch["attention_mask"])
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == config.steps - 1:
                log.info("toy: step %d/%d loss %.3f", step, config.steps, losses[-1])


class _GateRecorder:
    """Keeps the last forward's gate values ``g = gate_proj(x)`` of every decoder MLP (the
    input of its activation) for the firing penalty: the mean of ``relu(g)`` over real tokens,
    neurons and layers. It pushes each gate below 0 wherever firing does not help the answer,
    so a neuron fires (``a > 0``, what cas counts) for what it detects and is off elsewhere."""

    def __init__(self, model):
        self.values: list[torch.Tensor] = []
        self.handles = [act_module(mlp).register_forward_hook(self._keep)
                        for mlp in decoder_mlps(model)]  # fmt: skip

    def _keep(self, module, args, output) -> None:
        self.values.append(args[0])

    def firing(self, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.values[0].dtype)  # [rows, T, 1]
        layers = [(F.relu(g) * mask).sum() / (mask.sum() * g.shape[-1]) for g in self.values]
        self.values = []
        return sum(layers) / len(layers)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _lr_factor(config: ToyConfig):
    """Linear warmup over ``config.warmup`` steps, then cosine decay to 0 at the last step."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _accuracy(model, processor, items: list[Item]) -> float:
    """Share of ``items`` answered right by the evaluator's own scoring."""
    preds = predict(model, processor, items, batch_size=64)
    labels = torch.tensor([it.label for it in items])
    return float((preds == labels).float().mean())


def accuracy_per_culture(model, processor, data: CultureData) -> dict[str, float]:
    return {c: _accuracy(model, processor, list(its)) for c, its in data.items_by_culture.items()}
