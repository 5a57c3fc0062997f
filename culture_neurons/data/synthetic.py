"""Synthetic CVQA: small data in exactly CVQA's parquet schema, for tests and toy models.

Every culture has
- a visual cue: its own palette (a hue) and shape motif, drawn several times in each image,
- lexical cues: invented dishes, festivals, landmarks and garments, and a local language
  (its own syllables) in which the local questions are written.

Each question asks for the culture's item of one category ("Which dish is traditionally eaten
where this picture was taken?"). The four options are the right culture's item and items of
three other cultures (of a neutral pool when there are fewer than four cultures). The English
question never names the culture, so answering needs culture knowledge: image cue -> culture ->
its dish. With ``answers="shared"`` (false friends) the options are instead the same four
invented words for every culture and category, and each culture has its own table saying which
of them names which category (:func:`shared_table`; any two cultures' tables agree on at most
one category), so the answer needs image -> culture and that culture's table. Everything is
deterministic from the seed; the right letters are balanced over A-D in each culture (exactly
when ``items_per_culture`` is a multiple of 4).

A culture's words depend only on its name and its cue only on its position in the list, so the
same culture keeps its words across runs with different culture lists.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from culture_neurons.data.cvqa import culture_name, item_from_row
from culture_neurons.data.items import CultureData, stable_seed
from culture_neurons.data.synthetic_images import draw_image
from culture_neurons.errors import UsageError

logger = logging.getLogger(__name__)

# Invented (language, country) pairs; two countries have two languages each, as in CVQA
# (e.g. Indonesia, India), so grouping="country" merges them.
BUILTIN_CULTURES: tuple[tuple[str, str], ...] = (
    ("Amari", "Amaria"),
    ("Borun", "Borundi"),
    ("Calese", "Calesia"),
    ("Dunic", "Dunmark"),
    ("Elvan", "Elvaria"),
    ("Fenn", "Amaria"),
    ("Gorsk", "Gorskovo"),
    ("Halun", "Halunia"),
    ("Iskel", "Iskelia"),
    ("Jorva", "Borundi"),
    ("Kalo", "Kalovia"),
    ("Lumi", "Lumeria"),
)

MOTIFS = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "star",
    "ring",
    "hstripes",
    "vstripes",
    "hexagon",
)

# category -> (CVQA category name, English question, English noun appended to the word)
CATEGORIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dish": (
        "Cooking and food",
        "Which dish is traditionally eaten where this picture was taken?",
        ("stew", "bread", "dumplings", "soup", "cake", "rice"),
    ),
    "festival": (
        "Tradition / art / history",
        "Which festival is celebrated in the place shown in the picture?",
        ("festival", "feast", "day", "carnival", "fair", "night"),
    ),
    "landmark": (
        "Geography / buildings / landmarks",
        "Which landmark is in the same country as this scene?",
        ("tower", "gate", "temple", "bridge", "falls", "palace"),
    ),
    "garment": (
        "Objects / materials / clothing",
        "What is the traditional garment from the place in this picture called?",
        ("robe", "shawl", "hat", "sash", "cloak", "tunic"),
    ),
}
WORDS_PER_CATEGORY = 6
DISTRACTORS = ("cultures", "own")  # where the wrong options come from (see synthetic_rows)
ANSWERS = ("words", "facts", "shared")  # what the options are (see synthetic_rows)
POOL_GROUP = 4  # answers="shared": words per pool group, one per category (GF(4) tables)
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiouy"


@dataclass(frozen=True)
class SyntheticCulture:
    """One invented culture: its names, visual cue and words per category."""

    language: str
    country: str
    hue: float  # in [0, 1), HSV hue of the palette
    motif: str  # one of MOTIFS
    words: dict[str, tuple[str, ...]]  # category -> English names, e.g. "Tobaki stew"
    local_words: dict[str, tuple[str, ...]]  # category -> local names, e.g. "tobaki"
    local_questions: dict[str, str]  # category -> the question in the local language
    syllables: tuple[str, ...]
    facts: dict[str, str]  # category -> its noun of the category, e.g. "dumplings" (answers="facts")

    @property
    def name(self) -> str:
        return culture_name(self.language, self.country, "pair")

    @property
    def subset(self) -> str:
        """CVQA's Subset string, e.g. ``"('Amari', 'Amaria')"``."""
        return repr((self.language, self.country))


def _syllables(rng: random.Random) -> tuple[str, ...]:
    """A culture's own syllable inventory, so its words sound alike (a lexical cue)."""
    consonants = rng.sample(_CONSONANTS, 6)
    vowels = rng.sample(_VOWELS, 3)
    return tuple(c + v for c in consonants for v in vowels)


def _word(rng: random.Random, syllables: Sequence[str]) -> str:
    return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))


def make_culture(language: str, country: str, index: int) -> SyntheticCulture:
    """The culture ``(language, country)`` at position ``index`` of a culture list."""
    rng = random.Random(stable_seed("synthetic-culture", language, country))
    syllables = _syllables(rng)
    words: dict[str, tuple[str, ...]] = {}
    local_words: dict[str, tuple[str, ...]] = {}
    local_questions: dict[str, str] = {}
    used: set[str] = set()
    for category, (_, question, nouns) in CATEGORIES.items():
        stems: list[str] = []
        while len(stems) < WORDS_PER_CATEGORY:
            stem = _word(rng, syllables)
            if stem not in used:
                used.add(stem)
                stems.append(stem)
        words[category] = tuple(f"{s.capitalize()} {rng.choice(nouns)}" for s in stems)
        local_words[category] = tuple(stems)
        n_words = len(question.split())
        local_questions[category] = (
            " ".join(_word(rng, syllables) for _ in range(n_words)).capitalize() + "?"
        )
    # Hues spread by the golden ratio stay far apart for any number of cultures.
    hue = (index * 0.618033988749895) % 1.0
    motif = MOTIFS[index % len(MOTIFS)]
    # Its own stream: the words above stay what they were before facts existed.
    facts_rng = random.Random(stable_seed("synthetic-facts", language, country))
    facts = {category: facts_rng.choice(nouns) for category, (_, _, nouns) in CATEGORIES.items()}
    return SyntheticCulture(
        language, country, hue, motif, words, local_words, local_questions, syllables, facts
    )


@lru_cache(maxsize=1)
def shared_pool() -> tuple[str, ...]:
    """answers="shared": the invented words every culture uses, ``WORDS_PER_CATEGORY`` groups
    of :data:`POOL_GROUP` (group g = ``pool[g * POOL_GROUP : (g + 1) * POOL_GROUP]``), all
    different, of no culture's syllables (so their sound gives no culture away)."""
    rng = random.Random(stable_seed("synthetic-shared-pool"))
    syllables = _syllables(rng)
    words: list[str] = []
    while len(words) < WORDS_PER_CATEGORY * POOL_GROUP:
        word = _word(rng, syllables)
        if word not in words:
            words.append(word)
    return tuple(words)


# GF(4) multiplication (elements 0-3 as polynomials over GF(2) mod x^2 + x + 1; addition is XOR).
_GF4_MUL = ((0, 0, 0, 0), (0, 1, 2, 3), (0, 2, 3, 1), (0, 3, 1, 2))
MAX_SHARED_CULTURES = 12  # answers="shared": 3 orthogonal Latin squares of 4 rows (see below)


def shared_table(index: int, group: int) -> dict[str, str]:
    """answers="shared": category -> word of pool group ``group`` for the culture at position
    ``index`` of the culture list, a bijection onto the group's 4 words (false friends: the
    same word names other categories in other cultures).

    Category k of culture 4b + i is word ``a * k + i`` over GF(4), with a = 1 + (b + group) mod
    3: each block of four cultures is a Latin square (each word names each category exactly
    once: no word has a culture-free meaning), and two tables of different blocks agree on
    exactly one category ((a - a') k = i - j has one solution), so every pair of cultures
    shares at most one fact. Hence at most :data:`MAX_SHARED_CULTURES` cultures."""
    _check_shared_cultures(index + 1)
    a = 1 + (index // POOL_GROUP + group) % 3
    words = _pool_group(group)
    return {c: words[_GF4_MUL[a][k] ^ (index % POOL_GROUP)] for k, c in enumerate(CATEGORIES)}


def _check_shared_cultures(n: int) -> None:
    if n > MAX_SHARED_CULTURES:
        raise UsageError(f"answers='shared' has tables for at most {MAX_SHARED_CULTURES} "
                         f"cultures, not {n}; use fewer cultures")  # fmt: skip


def _pool_group(group: int) -> tuple[str, ...]:
    return shared_pool()[group * POOL_GROUP : (group + 1) * POOL_GROUP]


def _shared_options(
    index: int, category: str, group: int, rng: random.Random
) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """answers="shared": the culture's word of ``category`` in pool group ``group`` and the
    group's three other words, as (English, local) pairs (English capitalised, no noun: a noun
    would name the category)."""
    answer = shared_table(index, group)[category]
    wrong = [w for w in _pool_group(group) if w != answer]
    rng.shuffle(wrong)
    return (answer.capitalize(), answer), [(w.capitalize(), w) for w in wrong]


@lru_cache(maxsize=1)
def _neutral_culture() -> SyntheticCulture:
    """Words of no culture, used for distractors when there are fewer than four cultures."""
    return make_culture("Neutral", "Nowhere", 0)


def resolve_cultures(cultures: int | Sequence[str | tuple[str, str]]) -> list[SyntheticCulture]:
    """``8`` -> the first 8 built-in cultures (more are numbered); a list of names
    (``"Lang-Country"``, a plain name used for both, or ``(language, country)``) -> those."""
    pairs: list[tuple[str, str]] = []
    if isinstance(cultures, int) and not isinstance(cultures, bool):
        if cultures < 1:
            raise UsageError(f"cultures={cultures} must be >= 1 (or a list of culture names)")
        pairs = list(BUILTIN_CULTURES[:cultures])
        pairs += [(f"Lang{i}", f"Land{i}") for i in range(len(pairs), cultures)]
    else:
        for c in cultures:
            if isinstance(c, tuple) and len(c) == 2:
                pairs.append((str(c[0]), str(c[1])))
            elif isinstance(c, str) and c.strip():
                language, _, country = c.strip().partition("-")
                pairs.append((language, country or language))
            else:
                raise UsageError(
                    f"culture {c!r} is neither 'Language-Country', a name nor a "
                    "(language, country) pair"
                )
        if not pairs:
            raise UsageError("cultures is an empty list; give at least one culture name")
    if len(set(pairs)) != len(pairs):
        raise UsageError(f"cultures has duplicates: {pairs}")
    return [make_culture(lang, country, i) for i, (lang, country) in enumerate(pairs)]


# ---------------------------------------------------------------------------------------------
# Rows in CVQA's schema
# ---------------------------------------------------------------------------------------------


def _own_distractors(
    culture: SyntheticCulture, category: str, rng: random.Random, words_per_category: int
) -> list[tuple[str, str]]:
    """Three (English, local) names of ``culture`` itself, one of each other category."""
    names = []
    for other in CATEGORIES:
        if other != category:
            k = rng.randrange(words_per_category)
            names.append((culture.words[other][k], culture.local_words[other][k]))
    rng.shuffle(names)
    return names


def _fact_options(
    culture: SyntheticCulture, category: str, rng: random.Random
) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """The culture's fact of ``category`` and three other nouns of the category, as (English,
    local) pairs (the nouns are untranslated: no culture's word appears in the options)."""
    nouns = [n for n in CATEGORIES[category][2] if n != culture.facts[category]]
    wrong = rng.sample(nouns, 3)
    return (culture.facts[category],) * 2, [(n, n) for n in wrong]


def _distractors(
    answer: tuple[str, str],
    others: Sequence[SyntheticCulture],
    category: str,
    rng: random.Random,
    words_per_category: int = WORDS_PER_CATEGORY,
) -> list[tuple[str, str]]:
    """Three (English, local) names of the category from three other cultures (the neutral
    pool fills in when there are fewer), all different from each other and from the answer."""
    donors = list(others)
    rng.shuffle(donors)
    donors += [_neutral_culture()] * 3
    used_en, used_local = {answer[0]}, {answer[1]}
    names: list[tuple[str, str]] = []
    for donor in donors:
        if len(names) == 3:
            break
        # The neutral pool is no culture's knowledge: all of its words may fill in.
        n = WORDS_PER_CATEGORY if donor is _neutral_culture() else words_per_category
        choices = list(zip(donor.words[category][:n], donor.local_words[category][:n],
                           strict=True))  # fmt: skip
        rng.shuffle(choices)
        for english, local in choices:
            # Cultures draw syllables from one alphabet, so words may (rarely) coincide.
            if english not in used_en and local not in used_local:
                names.append((english, local))
                used_en.add(english)
                used_local.add(local)
                break
    return names


def synthetic_rows(
    cultures: int | Sequence[str | tuple[str, str]] = 8,
    items_per_culture: int = 64,
    *,
    seed: int = 0,
    image_size: int | tuple[int, int] = 64,
    hidden_labels: bool = False,
    words_per_category: int = WORDS_PER_CATEGORY,
    distractors: str = "cultures",
    answers: str = "words",
    vivid: bool = False,
) -> Iterator[dict[str, Any]]:
    """Rows (dicts with exactly CVQA's columns) of synthetic CVQA, culture by culture.

    ``image_size``: the side of every (square) image, or ``(smallest, largest)``: each image's
    width and height drawn between them (CVQA's photos differ in size and shape, and so do
    their prompts' image tokens). ``words_per_category`` (1 to 6) limits each culture to its
    first words of every category: fewer facts to know per culture. ``distractors``:
    ``"cultures"``, the wrong options are the category's words of three other cultures (the
    image's culture picks the answer); ``"own"``, they are the image's culture's own words of
    the three other categories (the question's category picks the answer, and only knowing what
    that culture's words mean tells which). ``answers``: ``"words"``, the options are invented
    words of cultures (as above); ``"facts"``, they are the category's plain English nouns
    (``"stew"``, ``"soup"``...), the same for every culture, and the right one is the image's
    culture's fact (its dish is soup): the options name no culture, so only knowing the
    culture's facts answers (``distractors`` is then unused); ``"shared"``, false friends: the
    options are the four words of one group of :func:`shared_pool` (group drawn among the first
    ``words_per_category``), the same for every culture and category, and the right one is
    the word the image's culture uses for the asked category (:func:`shared_table`: every
    culture its own bijection, each word naming each category equally often over each block
    of four cultures, at most 12 cultures; ``distractors`` unused). The shipped trained toy
    (:mod:`culture_neurons.demo.toy`) uses ``"words"`` and ``"cultures"`` (its ``ToyConfig``
    passes both on). ``vivid``: saturated
    image backgrounds (:func:`~culture_neurons.data.synthetic_images.draw_image`)."""
    if distractors not in DISTRACTORS:
        raise UsageError(f"distractors={distractors!r} must be one of {', '.join(DISTRACTORS)}")
    if answers not in ANSWERS:
        raise UsageError(f"answers={answers!r} must be one of {', '.join(ANSWERS)}")
    if not 1 <= words_per_category <= WORDS_PER_CATEGORY:
        raise UsageError(f"words_per_category={words_per_category} must be in "
                         f"[1, {WORDS_PER_CATEGORY}]")  # fmt: skip
    if items_per_culture < 1:
        raise UsageError(f"items_per_culture={items_per_culture} must be >= 1")
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or min(sides) < 16 or sides[0] > sides[1]:
        raise UsageError(f"image_size={image_size} must be a side >= 16 pixels (to draw the "
                         "motifs) or (smallest, largest) sides with 16 <= smallest <= largest")  # fmt: skip
    resolved = resolve_cultures(cultures)
    categories = list(CATEGORIES)
    if answers == "shared":  # checked before the first row, not midway
        _check_shared_cultures(len(resolved))
    for index, culture in enumerate(resolved):
        others = [c for c in resolved if c is not culture]
        # Right letters balanced over A-D: a seeded shuffle of 0,1,2,3,0,1,...
        labels = [i % 4 for i in range(items_per_culture)]
        random.Random(stable_seed("labels", seed, culture.name)).shuffle(labels)
        for i in range(items_per_culture):
            rng = random.Random(stable_seed("item", seed, culture.name, i))
            category = categories[i % len(categories)]
            cvqa_category, question, _ = CATEGORIES[category]
            k = rng.randrange(words_per_category)
            answer = (culture.words[category][k], culture.local_words[category][k])
            if answers == "facts":
                answer, options = _fact_options(culture, category, rng)
            elif answers == "shared":
                answer, options = _shared_options(index, category, k, rng)
            elif distractors == "own":
                options = _own_distractors(culture, category, rng, words_per_category)
            else:
                options = _distractors(answer, others, category, rng, words_per_category)
            options.insert(labels[i], answer)
            item_id = f"syn{seed}_{culture.language}_{culture.country}_{i:05d}"
            size = image_size
            if not isinstance(image_size, int):  # its own stream: square images stay as they were
                shape = random.Random(stable_seed("image size", seed, culture.name, i))
                size = (shape.randint(*sides), shape.randint(*sides))
            yield {
                "image": {"bytes": draw_image(culture, rng, size, vivid), "path": f"{item_id}.png"},
                "ID": item_id,
                "Subset": culture.subset,
                "Question": culture.local_questions[category],
                "Translated Question": question,
                "Options": [local for _, local in options],
                "Translated Options": [english for english, _ in options],
                "Label": -1 if hidden_labels else labels[i],
                "Category": cvqa_category,
                "Image Type": "Synthetic",
                "Image Source": "culture_neurons.data.synthetic",
                "License": "CC0",
            }


def cvqa_arrow_schema() -> Any:
    """CVQA's parquet schema (pyarrow), with the ``huggingface`` metadata that lets
    ``datasets`` decode ``image`` as an Image feature, as in the real files."""
    import pyarrow as pa

    string = pa.string()
    fields = [
        ("image", pa.struct([("bytes", pa.binary()), ("path", string)])),
        ("ID", string),
        ("Subset", string),
        ("Question", string),
        ("Translated Question", string),
        ("Options", pa.list_(string)),
        ("Translated Options", pa.list_(string)),
        ("Label", pa.int64()),
        ("Category", string),
        ("Image Type", string),
        ("Image Source", string),
        ("License", string),
    ]
    value = {"dtype": "string", "_type": "Value"}
    features: dict[str, Any] = {name: dict(value) for name, _ in fields}
    features["image"] = {"_type": "Image"}
    features["Options"] = {"feature": dict(value), "_type": "Sequence"}
    features["Translated Options"] = {"feature": dict(value), "_type": "Sequence"}
    features["Label"] = {"dtype": "int64", "_type": "Value"}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=metadata)


def write_synthetic_cvqa(
    path: str | Path,
    cultures: int | Sequence[str | tuple[str, str]] = 8,
    items_per_culture: int = 64,
    *,
    seed: int = 0,
    image_size: int | tuple[int, int] = 64,
    hidden_labels: bool = False,
    num_files: int = 1,
    rows_per_group: int = 100,
    words_per_category: int = WORDS_PER_CATEGORY,
    distractors: str = "cultures",
    answers: str = "words",
    vivid: bool = False,
) -> Path:
    """Write synthetic CVQA as parquet in CVQA's schema; return what to pass to ``load_cvqa``.

    ``path`` ending in ``.parquet`` gets one file; any other path is a folder that gets
    ``data/test-0000i-of-0000n.parquet`` (``num_files`` of them) as on the hub, and is returned.
    ``rows_per_group`` rows per parquet row group (100, as ``datasets`` writes image data).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if num_files < 1:
        raise UsageError(f"num_files={num_files} must be >= 1")
    rows = list(
        synthetic_rows(
            cultures,
            items_per_culture,
            seed=seed,
            image_size=image_size,
            hidden_labels=hidden_labels,
            words_per_category=words_per_category,
            distractors=distractors,
            answers=answers,
            vivid=vivid,
        )
    )
    schema = cvqa_arrow_schema()
    out = Path(path)
    if out.suffix == ".parquet":
        if num_files != 1:
            raise UsageError(f"{out} is one file; pass a folder for num_files={num_files}")
        targets = [out]
    else:
        targets = [
            out / "data" / f"test-{i:05d}-of-{num_files:05d}.parquet" for i in range(num_files)
        ]
    per_file = math.ceil(len(rows) / len(targets))
    for i, target in enumerate(targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        chunk = rows[i * per_file : (i + 1) * per_file]
        table = pa.Table.from_pylist(chunk, schema=schema)
        pq.write_table(table, target, row_group_size=rows_per_group)
    logger.info("synthetic CVQA: wrote %d items to %s", len(rows), out)
    return out


def make_synthetic_items(
    cultures: int | Sequence[str | tuple[str, str]] = 8,
    items_per_culture: int = 64,
    *,
    seed: int = 0,
    image_size: int | tuple[int, int] = 64,
    hidden_labels: bool = False,
    grouping: str = "pair",
    language: str = "en",
    words_per_category: int = WORDS_PER_CATEGORY,
    distractors: str = "cultures",
    answers: str = "words",
    vivid: bool = False,
) -> CultureData:
    """Synthetic CVQA in memory (images kept as PNG bytes), built by the loader's own row
    parser, so it holds the same items as ``load_cvqa(write_synthetic_cvqa(...))``."""
    groups: dict[str, list] = {}
    for row in synthetic_rows(
        cultures,
        items_per_culture,
        seed=seed,
        image_size=image_size,
        hidden_labels=hidden_labels,
        words_per_category=words_per_category,
        distractors=distractors,
        answers=answers,
        vivid=vivid,
    ):
        item = item_from_row(row, grouping=grouping, language=language)
        groups.setdefault(item.culture, []).append(item)
    return CultureData(
        items_by_culture={c: tuple(items) for c, items in groups.items()},
        labels_available=not hidden_labels,
        grouping=grouping,
        language=language,
        source="synthetic (in memory)",
    )
