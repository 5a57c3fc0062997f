"""A trained toy VLM: a tiny Qwen2.5-VL that really knows the synthetic cultures.

The random models of :mod:`culture_neurons.models.tiny` exercise code paths; they answer at
chance, so nothing can be learned from ablating them. This toy is trained, on CPU in a few
minutes, on synthetic CVQA (:mod:`culture_neurons.data.synthetic`): each culture has its own
image cue (hue + motif) and invented words, and the right option is the word of the image's
culture. The model has to learn image -> culture and word -> culture and match the two, so
culture knowledge sits in its weights and a pipeline run (record, select, ablate, evaluate) has
something to find.

    from culture_neurons.demo.toy import toy
    t = toy()                      # the shipped toy: loaded from the package, hash-checked
    t.model, t.processor           # Qwen2_5_VLForConditionalGeneration + its processor
    t.data                         # CultureData the default run uses (read from t.data_path)

The same toy everywhere: it is trained once (``python -m culture_neurons.demo.build``) and
shipped in the package (:mod:`.shipped`: weights, processor, data, content hashes, and the
default run's headline numbers), so no machine trains and every machine runs the same weights
on the same items. Float results differ between processors, so a toy trained on another
machine would be another model: :func:`toy` rebuilds only where the shipped files are missing,
and refuses a rebuild whose hashes differ.

What makes it meaningful:
- training items come from the same generator with another seed (new images, new option
  draws, same cultures and words); the data the pipeline uses (``Toy.data_path``) is never
  trained on, so its accuracy measures generalisation to new items of the same cultures;
- the loss is the evaluator's own score: cross-entropy over the four option-letter logits
  (:func:`culture_neurons.evaluate.letter_scores`), on prompts built by
  :func:`culture_neurons.prompting.encode`, exactly as evaluation builds them;
- the vision tower stays at its random initialisation (frozen), so the decoder, not the vision
  tower, must turn raw image features into a culture: that is where the paper looks for neurons.

toy-v5's recipe (issue #23), chosen so that a culture's knowledge sits in neurons that *fire*
for that culture (what cas counts: ``a > 0``), not only in how strongly shared neurons fire:
- images of 112 pixels (16 image tokens of the ~43 in a prompt; toy-v4 had 64, 4 tokens): the
  tokens that only a culture's items have are a larger share of what the statistics count;
- the answer letter is learned at the last 8 prompt positions (``answer_positions``: from the
  last option line on, every position has read all the options), not only at the answer
  position: the culture matching is needed at 8 of the ~43 positions, so the neurons doing it
  can fire at 8 positions, not 1, of what cas's per-token firing counts see (the evaluation
  scores the answer position only, as before);
- a firing penalty, 0.2 x the mean of ``relu(gate_proj(x))`` over tokens, neurons and layers
  (``firing_penalty``): each gate is pushed below 0 wherever firing does not help the answer, so
  a neuron fires for what it detects and is silent elsewhere (mean firing probability 8 %
  against 45 % without it).
Each culture knows one word per category (``words_per_category=1``: 4 facts per culture; with 6
the model memorised without generalising, toy-v1: 28 %); the decoder MLPs are narrow (3 x 96 =
288 neurons; with 384 or 192 a culture's knowledge spread over redundant neurons and ablating
its top 10 % cost it little). All of this was chosen after seeing the default run of each
variant on seed 0 (bench/RESULTS.md lists the 11 variants and their numbers): the headline's p
is one run's test and does not correct for that search.

Two options of :class:`ToyConfig`, off in toy-v5, from a later attempt at issue #23's diagonal
(bench/RESULTS.md: 5 more variants, none met its bar):
- ``distractors="own"``: the wrong options are the image's culture's own words of the other
  categories (:func:`~culture_neurons.data.synthetic.synthetic_rows`), so a culture's words
  appear only in its own prompts and answering needs what that culture's words mean;
- ``freeze_embeddings``: the token embeddings stay at their random initialisation, as the
  vision tower does. Why: a trainable embedding can hold a word's meaning by itself (its
  category or culture, one vector per option token), and then no MLP neuron needs to carry
  it; with the embeddings frozen the decoder must compute it, and the paper looks for it in
  the MLPs. (lm_head is not tied to the embeddings here, so it trains.)

A third attempt (bench/RESULTS.md, "false friends": none met the bar either) added
``answers="shared"``: the four options are the same invented words for every culture and
category, each culture has its own table of which word names which category
(:func:`~culture_neurons.data.synthetic.shared_table`), so the answer needs image -> culture
and that culture's table (no other culture's table agrees with it on more than one category). Its
option lines are added to the tokenizer's corpus only for such toys, so other toys'
tokenizers (the shipped one's included) stay as they were.

The default run (``culture-neurons run``) evaluates 150 items per culture, half to identify
neurons and half (75 per culture) to evaluate, where one item is 1.3 points of a culture's
accuracy. Its selection ratio is :data:`TOY_RATIO`, 10 % of the L*N neurons per culture. The
run recomputes everything and its report states what this run found, whatever it is;
``headline.json`` beside the shipped toy keeps what the shipped toy's run found (RESULTS.md).

The toy's matrices are 64 wide: on 2 shared cores a forward runs 2-50x slower with 2 torch
threads than with 1 (thread synchronisation; measured), and 8-row forwards half as fast as
128-row ones, hence :data:`TOY_THREADS` and :data:`TOY_BATCH_SIZE` for the default run.

Cache layout of a toy built here (``<root>/<VERSION>-seed<seed>``, root =
``$CULTURE_NEURONS_CACHE`` or ``~/.cache/culture-neurons``), the same as the shipped folder's:
``model/`` (save_pretrained weights with the processor beside them, so ``culture-neurons run
--model <folder>/model --data <folder>/data.parquet`` works too), ``data.parquet`` (synthetic
CVQA, CVQA's schema), ``toy.json`` (seed, config, accuracy reached, build time; the shipped
one adds its content hashes). It is written to a temporary folder and renamed into place, so a
killed build never leaves a half cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
)

from culture_neurons.data import CultureData, load_cvqa, stable_seed
from culture_neurons.data.synthetic import (
    CATEGORIES,
    make_synthetic_items,
    resolve_cultures,
    shared_pool,
    write_synthetic_cvqa,
)
from culture_neurons.demo.shipped import (
    SHIPPED,
    check_hashes,
    content_hashes,
    shipped_files_present,
)
from culture_neurons.demo.training import accuracy_per_culture, train
from culture_neurons.errors import UsageError
from culture_neurons.models import tiny
from culture_neurons.models.adapters import get_adapter
from culture_neurons.models.loading import load_processor, save_processor
from culture_neurons.scoring.prompting import INSTRUCTION, LETTERS

__all__ = [
    "Toy",
    "ToyConfig",
    "build_toy",
    "default_cache_dir",
    "load_toy",
    "recorded_config",
    "toy",
]

log = logging.getLogger(__name__)

FAMILY = "qwen2_5_vl"  # the toy is a tiny Qwen2.5-VL (testing.tiny's, at the sizes below)
TOY_RATIO = 0.10  # default selection ratio on the toy (its L*N is 288, see the module doc)
TOY_THREADS = 1  # torch threads of the default run (see the module doc)
TOY_BATCH_SIZE = 128  # rows per forward of the default run (see the module doc)
VERSION = "toy-v5"  # part of the cache folder name: bump it when the recipe changes


@dataclass(frozen=True)
class ToyConfig:
    """Everything that defines a toy besides its seed (sizes of the 7B model beside them)."""

    cultures: int = 8  # CVQA: 25 culture groups (paper), ~30 countries
    eval_items: int = 150  # per culture in the run's data (half identify, half evaluate)
    train_items: int = 512  # per culture, drawn with another seed than data_path
    words_per_category: int = 1  # facts per culture and category (synthetic.py has up to 6)
    answers: str = "words"  # synthetic answers: "words", "facts" or "shared" (false friends)
    distractors: str = "cultures"  # wrong options: other cultures' words or the culture's "own"
    vivid: bool = False  # synthetic images: saturated backgrounds (see draw_image)
    image_size: int = 112  # image side in pixels: 64 -> 4 image tokens, 112 (the cap) -> 16
    hidden: int = 64  # Qwen2-7B 3584
    intermediate: int = 96  # 18944; L * N = 288 neurons, 10 % = 29 per culture (module doc)
    layers: int = 3  # 28
    heads: int = 4  # 28 (head_dim 16 here, 128 real)
    kv_heads: int = 2  # 4
    vocab: int = 8192  # BPE cap; training stops at ~3.3k, when every prompt line is one token
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 30
    init_std: float = 0.1  # decoder init (HF default 0.02); see _init_decoder
    answer_positions: int = 8  # the last k prompt positions all learn the answer (training)
    firing_penalty: float = 0.2  # weight of the mean relu(gate) penalty (training.train)
    freeze_embeddings: bool = False  # token embeddings stay at their random init (training)


# Fields added to ToyConfig after toys were built and recorded without them, with the value
# every such toy had (its behaviour before the field existed).
_BEFORE_FIELD = {"distractors": "cultures", "freeze_embeddings": False}


def recorded_config(meta: dict) -> ToyConfig:
    """The :class:`ToyConfig` a toy.json records; a field it lacks (added later) takes the
    value toys had before the field existed, not today's default."""
    return ToyConfig(**{**_BEFORE_FIELD, **meta["config"]})


@dataclass
class Toy:
    """A trained toy model with its processor and the data it is evaluated on."""

    model: Qwen2_5_VLForConditionalGeneration
    processor: object  # a Qwen2.5-VL processor (tokenizer + Pil image processor)
    data_path: Path  # synthetic CVQA parquet (CVQA's schema): what the pipeline loads
    data: CultureData  # load_cvqa(data_path), C cultures x eval_items
    description: str  # what the toy is and what data the run gets, for reports
    cache_dir: Path
    metadata: dict  # the contents of toy.json


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def default_cache_dir(seed: int = 0) -> Path:
    """``$CULTURE_NEURONS_CACHE/<VERSION>-seed<seed>`` (root default
    ``~/.cache/culture-neurons``)."""
    root = os.environ.get("CULTURE_NEURONS_CACHE") or Path.home() / ".cache" / "culture-neurons"
    return Path(root) / f"{VERSION}-seed{seed}"


def toy(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    config: ToyConfig | None = None,
) -> Toy:
    """The toy of ``seed``. The default one (seed 0, default config, no ``cache_dir``) is the
    shipped toy (:mod:`.shipped`): loaded from the package and checked against its recorded
    hashes; where its files are missing it is rebuilt into the cache and must hash the same
    (:class:`~culture_neurons.demo.shipped.ToyMismatchError` if not). Any other toy is loaded
    from ``cache_dir`` if built there before, else built (minutes on 2 CPU cores), cached, and
    loaded. ``force=True`` rebuilds over the cache. ``config``: another recipe than
    :class:`ToyConfig`'s defaults (give it its own cache_dir)."""
    config = config or ToyConfig()
    expected = _shipped_hashes(seed, config) if cache_dir is None and not force else None
    if expected is not None and shipped_files_present():
        log.info("loading the embedded toy VLM (%s, shipped in %s) and checking its hashes",
                 VERSION, SHIPPED)  # fmt: skip
        shipped = load_toy(SHIPPED)
        check_hashes(_hashes(shipped), expected, SHIPPED, rebuilt=False)
        return shipped
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir(seed)
    if force or not (target / "toy.json").is_file():
        # Said before the silence of training: the first use builds, later ones load.
        log.info("building the embedded toy VLM of seed %d (a few minutes on 2 CPU cores; "
                 "cached in %s and loaded in seconds afterwards)", seed, target)  # fmt: skip
        build_toy(seed, target, force=force, config=config)
    _check_cache(target, seed, config)
    built = load_toy(target)
    if expected is not None:  # the shipped toy's files are missing: this rebuild must match
        check_hashes(_hashes(built), expected, target, rebuilt=True)
    return built


def _shipped_hashes(seed: int, config: ToyConfig) -> dict | None:
    """The hashes the shipped toy records, if ``seed`` and ``config`` are the shipped ones."""
    meta_file = SHIPPED / "toy.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta["seed"] != seed or recorded_config(meta) != config:
        return None
    return meta.get("hashes")


def _hashes(t: Toy) -> dict[str, str]:
    return content_hashes(t.model, t.processor, t.data)


def _check_cache(path: Path, seed: int, config: ToyConfig) -> None:
    """Refuse a cache built from another seed or recipe (it would silently answer for them)."""
    meta = json.loads((path / "toy.json").read_text())
    if meta["seed"] != seed or recorded_config(meta) != config:
        raise UsageError(
            f"{path} holds the toy of seed {meta['seed']} with config {meta['config']}, not seed "
            f"{seed} with {asdict(config)}; pass another cache_dir or force=True to rebuild it"
        )


def load_toy(cache_dir: str | os.PathLike) -> Toy:
    """Load a built toy (model in eval mode, fp32, eager attention) from its cache folder."""
    path = Path(cache_dir)
    meta_file = path / "toy.json"
    if not meta_file.is_file():
        raise UsageError(f"{path} holds no built toy (no toy.json); build it with toy(seed)")
    meta = json.loads(meta_file.read_text())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path / "model", attn_implementation="eager", dtype=torch.float32
    ).eval()
    processor = load_processor(str(path / "model"), get_adapter(model))
    data = load_cvqa(path / "data.parquet", min_items=1)
    description = describe(model, recorded_config(meta), meta)  # current wording
    return Toy(model, processor, path / "data.parquet", data, description, path, meta)


def build_toy(
    seed: int, cache_dir: str | os.PathLike, force: bool = False, config: ToyConfig | None = None
) -> Path:
    """Build the toy of ``seed`` into ``cache_dir`` atomically; return ``cache_dir``.

    A finished cache is kept unless ``force``; a build of another process that finishes first
    wins (its cache is kept, this one discarded).
    """
    config = config or ToyConfig()
    target = Path(cache_dir)
    if (target / "toy.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build_into(seed, config, tmp)
        _replace(tmp, target, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def _build_into(seed: int, config: ToyConfig, out: Path) -> None:
    """Write data, model, processor and toy.json of the toy into the (empty) folder ``out``.

    Runs on one CPU thread: the matrices are 64 wide, so threads only add synchronisation, and
    on a shared machine (load ~5 on 2 cores) a training step took ~1.5 s with 2 threads against
    ~0.2-0.3 s with 1 (measured here).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build_steps(seed, config, out)
    finally:
        torch.set_num_threads(threads)


def _build_steps(seed: int, config: ToyConfig, out: Path) -> None:
    start = time.perf_counter()
    data_path = write_synthetic_cvqa(
        out / "data.parquet", config.cultures, config.eval_items, seed=seed,
        words_per_category=config.words_per_category, image_size=config.image_size,
        answers=config.answers, distractors=config.distractors, vivid=config.vivid,
    )  # fmt: skip
    data = load_cvqa(data_path, min_items=1)
    train_items = list(
        make_synthetic_items(
            config.cultures,
            config.train_items,
            seed=_train_seed(seed),
            words_per_category=config.words_per_category,
            image_size=config.image_size,
            answers=config.answers,
            distractors=config.distractors,
            vivid=config.vivid,
        )
    )
    processor = toy_processor(config)
    model = toy_model(processor, config, seed)
    losses = train(model, processor, train_items, config, seed)
    per_culture = accuracy_per_culture(model, processor, data)
    accuracy = sum(per_culture.values()) / len(per_culture)  # equal items per culture
    model.save_pretrained(out / "model")
    # The processor beside the weights: `culture-neurons run --model <cache>/model` loads both.
    save_processor(processor, out / "model")
    seconds = time.perf_counter() - start
    meta = {
        "version": VERSION,
        "seed": seed,
        "train_seed": _train_seed(seed),
        "config": asdict(config),
        "cultures": data.cultures,
        "accuracy": accuracy,
        "accuracy_per_culture": per_culture,
        "final_loss": losses[-1],
        "build_seconds": round(seconds, 1),
    }
    meta["description"] = describe(model, config, meta)
    (out / "toy.json").write_text(json.dumps(meta, indent=2))
    log.info("toy: built in %.0f s, accuracy %.1f %% (%s)", seconds, 100 * accuracy, out)


STALE_BUILD_SECONDS = 3600  # a temporary build folder this old belongs to a killed build


def _remove_stale_builds(target: Path) -> None:
    """Delete temporary folders of builds that were killed (SIGKILL/SIGTERM skip cleanup);
    fresh ones may belong to a build running in another process and are left alone."""
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        if now - tmp.stat().st_mtime > STALE_BUILD_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


def _train_seed(seed: int) -> int:
    """Training items get their own generator seed: new images and option draws, same cultures."""
    return stable_seed("toy-train", seed) % (2**31)


def _replace(tmp: Path, target: Path, force: bool) -> None:
    """Move the finished build ``tmp`` to ``target`` (one rename; the old cache goes if forced)."""
    if target.exists():
        if not force and (target / "toy.json").is_file():
            return  # another process finished first: keep its cache
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, target)


def describe(model, config: ToyConfig, meta: dict) -> str:
    """One paragraph for reports: what the toy is, how it was trained and what data the run
    gets. No accuracy: the report states the one the run measures (toy.json keeps the build's)."""
    tc = model.config.text_config
    frozen = "vision tower and token embeddings" if config.freeze_embeddings else "vision tower"
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"The embedded toy ({VERSION}, seed {meta['seed']}): a Qwen2_5_VLForConditionalGeneration "
        f"of {n_params / 1e3:.0f}k parameters, decoder {tc.num_hidden_layers} layers x "
        f"{tc.intermediate_size} MLP neurons (hidden {tc.hidden_size}, SiLU), vocabulary "
        f"{tc.vocab_size}, {frozen} random and frozen. It was trained for {config.steps} "
        f"AdamW steps (batch {config.batch_size}, lr {config.lr}) on {config.cultures} x "
        f"{config.train_items} synthetic CVQA items of {config.image_size}-pixel images "
        f"(cross-entropy on the option letter at the last {config.answer_positions} prompt "
        f"positions, plus {config.firing_penalty:g} x the mean relu of the MLP gates, so that "
        f"neurons fire only where it helps). The run's data are {config.cultures} cultures x "
        f"{config.eval_items} other items of the same cultures, never trained on; the run "
        f"splits each culture's items into an identification part and an evaluation part. "
        + _lape_note(tc.num_hidden_layers * tc.intermediate_size, config.cultures)
        + (_SEARCH_NOTE if config == ToyConfig() else "")
    )


# What the shipped recipe can and cannot show (issue #23: say so in the report where an honest
# toy does not show the paper's diagonal); bench/RESULTS.md lists every recipe tried.
_SEARCH_NOTE = (
    " This recipe was picked among the 21 toys built on seed 0 for cas's adjusted p against its "
    "random sets (bench/RESULTS.md, 'The embedded toy'); in none of them did cas's sets clearly "
    "harm most of their own cultures, so this toy shows no clear per-culture diagonal, and its "
    "p-value does not correct for that choice."
)


def _lape_note(neurons: int, cultures: int) -> str:
    """Why lape leaves cultures without a set on the toy: it keeps its own share of all
    neurons (``lape_top_rate``, never the run's ratio), a handful of the toy's few hundred."""
    from culture_neurons.pipeline.config import RunConfig

    rate = RunConfig().lape_top_rate
    kept = max(1, round(neurons * rate))
    if kept >= cultures:
        return ""
    return (
        f"At its default top rate lape keeps {rate:.0%} of all {neurons} neurons ({kept}) "
        f"before assigning each to the cultures where it fires most, fewer than the "
        f"{cultures} cultures, so some cultures get no lape set and their lape row is the "
        f"unablated model's (a matter of the toy's size, not of its neurons: "
        f"--lape-top-rate sets the share)."
    )


# ----------------------------------------------------------------------------------------------
# Tokenizer, processor, model
# ----------------------------------------------------------------------------------------------
def _corpus(config: ToyConfig) -> list[str]:
    """tiny.py's corpus plus every line a toy prompt can hold (questions, options, system
    prompt, instruction), each often enough to become one token."""
    lines = list(tiny.corpus())
    fixed = ["You are a helpful assistant.", INSTRUCTION, "system", "user", "assistant"]
    fixed += [question for _, question, _ in CATEGORIES.values()]
    fixed += [f"{letter}. {noun}" for _, _, nouns in CATEGORIES.values() for noun in nouns
              for letter in LETTERS]  # the options of answers="facts"
    if config.answers == "shared":  # only then: other toys' tokenizers stay as they were
        fixed += [f"{letter}. {w.capitalize()}" for w in shared_pool() for letter in LETTERS]
    for culture in resolve_cultures(config.cultures):
        for words in culture.words.values():
            lines += [f"{letter}. {word}" for word in words for letter in LETTERS]
    return lines + fixed * 4


def toy_tokenizer(config: ToyConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE that splits text only at line breaks, trained until every line of
    :func:`_corpus` is one token (special tokens, chat template: Qwen2's, as in tiny.py).

    So an option line ``"B. Tobaki stew"`` is one token that carries its letter and its
    culture's word. Why: with letter and word in separate tokens, answering needs two attention
    hops (find the word of the image's culture, then the letter before it), which a model this
    small does not learn within a CPU budget of minutes (measured: 300 steps at chance); with
    one token per line it needs one, and prompts shrink from ~70 tokens to ~20.
    """
    spec = tiny.special_tokens(FAMILY)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab - len(spec.tail),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte: no text is unknown
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(config), trainer)
    tok.add_special_tokens(list(spec.tail))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=spec.eos,
        pad_token=spec.pad,
        extra_special_tokens=dict(spec.extra),
        chat_template=tiny.chat_template(FAMILY),
        padding_side="right",
    )


def toy_processor(config: ToyConfig):
    """tiny.py's Qwen2.5-VL processor (Pil image processor, no video) over the toy tokenizer."""
    return tiny.tiny_processor(FAMILY, toy_tokenizer(config))


def toy_model(processor, config: ToyConfig, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL of the toy's sizes (tiny.py's vision tower), fp32, eager attention."""
    head_dim = config.hidden // config.heads
    _, model_config = tiny.tiny_config(
        FAMILY,
        processor.tokenizer,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        # mrope splits head_dim / 2 rotary frequencies over (t, h, w); real [16, 24, 24].
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": _mrope_section(head_dim),
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            model_config, attn_implementation="eager", dtype=torch.float32
        )
        _init_decoder(model, config.init_std)
    return model.eval()


def _init_decoder(model, std: float) -> None:
    """Re-initialise the decoder for training from scratch in a few hundred steps.

    Weights (embeddings, projections, lm_head) ~ N(0, std) instead of HF's N(0, 0.02): with
    0.02, signals through this 64-wide decoder are so small that training sat at chance for
    300+ steps (measured); ``std`` 0.1 learned an image-only probe in ~75. Query projections
    start at zero, so every head begins as a causal average of the values (the answer position
    sees all options and the image at once) and only sharpens where the loss asks for it.
    """
    adapter = get_adapter(model)
    lm = adapter.language_model(model)
    with torch.no_grad():
        for module in [*lm.modules(), model.lm_head]:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        for layer in adapter.decoder_layers(model):
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.q_proj.bias.zero_()


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 frequencies over (t, h, w) about as Qwen2.5-VL does (16:24:24)."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]

