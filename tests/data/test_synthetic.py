"""Synthetic CVQA: CVQA's exact schema, determinism, balanced letters, culture cues."""

from __future__ import annotations

import collections
import io
import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from culture_neurons.data import CVQA_COLUMNS, load_cvqa, make_synthetic_items, write_synthetic_cvqa
from culture_neurons.data.synthetic import (
    BUILTIN_CULTURES,
    CATEGORIES,
    cvqa_arrow_schema,
    resolve_cultures,
    synthetic_rows,
)
from culture_neurons.errors import UsageError


def test_parquet_has_cvqa_columns_and_types(tmp_path):
    path = write_synthetic_cvqa(tmp_path / "cvqa.parquet", cultures=2, items_per_culture=4)
    schema = pq.read_schema(path)
    assert schema.names == list(CVQA_COLUMNS)
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("Label").type == pa.int64()
    for name in ("Options", "Translated Options"):
        assert pa.types.is_list(schema.field(name).type)
        assert schema.field(name).type.value_type == pa.string()
    for name in set(CVQA_COLUMNS) - {"image", "Label", "Options", "Translated Options"}:
        assert schema.field(name).type == pa.string(), name
    row = pq.read_table(path).slice(0, 1).to_pylist()[0]
    assert row["Subset"] == "('Amari', 'Amaria')"
    assert Image.open(io.BytesIO(row["image"]["bytes"])).format == "PNG"


def test_datasets_reads_image_as_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write_synthetic_cvqa(tmp_path / "cvqa.parquet", cultures=2, items_per_culture=4)
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (64, 64)


def test_deterministic_from_seed():
    first = list(synthetic_rows(3, 8, seed=5))
    assert first == list(synthetic_rows(3, 8, seed=5))
    other = list(synthetic_rows(3, 8, seed=6))
    assert [r["image"]["bytes"] for r in first] != [r["image"]["bytes"] for r in other]


def test_letters_balanced_per_culture():
    labels = collections.defaultdict(list)
    for row in synthetic_rows(4, 12):
        labels[row["Subset"]].append(row["Label"])
    for subset, values in labels.items():
        assert collections.Counter(values) == {0: 3, 1: 3, 2: 3, 3: 3}, subset


@pytest.mark.parametrize(("n_cultures", "words"), [(1, 6), (2, 6), (6, 6), (2, 1), (3, 1)])
def test_answer_needs_culture_knowledge(n_cultures, words):
    cultures = {c.subset: c for c in resolve_cultures(n_cultures)}
    for row in synthetic_rows(n_cultures, 8, words_per_category=words):
        culture = cultures[row["Subset"]]
        options = row["Translated Options"]
        assert len(set(options)) == 4 and len(set(row["Options"])) == 4
        answer = options[row["Label"]]
        category = next(k for k, words in culture.words.items() if answer in words)
        # Distractors are the same kind of thing, but never of the image's culture.
        for k, option in enumerate(options):
            if k != row["Label"]:
                assert option not in culture.words[category]
        # The English question does not give the culture away.
        assert culture.language not in row["Translated Question"]
        assert culture.country not in row["Translated Question"]


@pytest.mark.parametrize("words", [1, 3])
def test_own_distractors_need_the_cultures_own_vocabulary(words):
    """distractors="own": the four options are the image's culture's words, one per category,
    the answer is the word of the asked category, and every word comes from the culture's
    first ``words`` of that category; so no option belongs to another culture."""
    cultures = {c.subset: c for c in resolve_cultures(8)}
    questions = {question: category for category, (_, question, _) in CATEGORIES.items()}
    seen = collections.Counter()
    for row in synthetic_rows(8, 12, words_per_category=words, distractors="own"):
        culture = cultures[row["Subset"]]
        category_of = {w: k for k, ws in culture.words.items() for w in ws[:words]}
        options = row["Translated Options"]
        assert all(option in category_of for option in options), options
        assert sorted(category_of[o] for o in options) == sorted(CATEGORIES)
        asked = questions[row["Translated Question"]]
        assert category_of[options[row["Label"]]] == asked
        local_of = dict(zip(culture.words[asked], culture.local_words[asked], strict=True))
        assert row["Options"][row["Label"]] == local_of[options[row["Label"]]]
        seen[row["Label"]] += 1
    assert set(seen) == {0, 1, 2, 3}
    with pytest.raises(UsageError, match="distractors"):
        next(synthetic_rows(2, 4, distractors="neighbours"))


def test_fact_answers_name_no_culture():
    """answers="facts": the options are four different plain nouns of the asked category, the
    same pool for every culture, and the right one is the culture's fact of that category;
    no option is any culture's invented word, so only knowing the image's culture answers."""
    cultures = {c.subset: c for c in resolve_cultures(8)}
    questions = {question: category for category, (_, question, _) in CATEGORIES.items()}
    invented = {w for c in cultures.values() for ws in c.words.values() for w in ws}
    seen = collections.Counter()
    for row in synthetic_rows(8, 12, answers="facts"):
        culture = cultures[row["Subset"]]
        asked = questions[row["Translated Question"]]
        options = row["Translated Options"]
        assert len(set(options)) == 4 and set(options) <= set(CATEGORIES[asked][2]), options
        assert not set(options) & invented and row["Options"] == options
        assert options[row["Label"]] == culture.facts[asked]
        seen[row["Label"]] += 1
    assert set(seen) == {0, 1, 2, 3}
    # Facts differ between cultures (else their items would be one task).
    assert len({tuple(c.facts.values()) for c in cultures.values()}) == len(cultures)
    with pytest.raises(UsageError, match="answers"):
        next(synthetic_rows(2, 4, answers="letters"))


@pytest.mark.parametrize(
    ("seed", "n_cultures", "words"), [(0, 8, 1), (3, 12, 2), (11, 4, 6), (7, 5, 3)]
)
def test_shared_answers_are_false_friends(seed, n_cultures, words):
    """answers="shared": the options are the same four pool words for every culture and
    category (one pool group per item), the right one follows the culture's own table, read
    back from the rows alone: one word per (culture, group, category), a bijection per
    (culture, group), each word naming each category equally often in every block of four
    cultures, and two cultures agreeing on at most one category per group."""
    questions = {question: category for category, (_, question, _) in CATEGORIES.items()}
    table: dict[tuple[str, frozenset], dict[str, str]] = collections.defaultdict(dict)
    groups = set()
    order = []
    for row in synthetic_rows(n_cultures, 24, seed=seed, answers="shared",
                              words_per_category=words):  # fmt: skip
        options = row["Translated Options"]
        assert len(set(options)) == 4 and row["Options"] == [o.lower() for o in options]
        group = frozenset(row["Options"])
        groups.add(group)
        asked = questions[row["Translated Question"]]
        known = table[row["Subset"], group].setdefault(asked, row["Options"][row["Label"]])
        assert known == row["Options"][row["Label"]], (row["Subset"], asked)  # one answer
        if row["Subset"] not in order:
            order.append(row["Subset"])
    # The groups partition the pool: no word in two groups (the options name the group only).
    assert sum(map(len, groups)) == len(set().union(*groups)) == 4 * len(groups)
    assert len(groups) <= words
    for (subset, group), facts in table.items():
        if len(facts) == len(CATEGORIES):
            assert set(facts.values()) == group, subset  # a bijection onto the group's words
    for group in groups:
        complete = [s for s in order if len(table[s, group]) == len(CATEGORIES)]
        for a, b in itertools.combinations(complete, 2):
            same = sum(table[a, group][c] == table[b, group][c] for c in CATEGORIES)
            assert same <= 1, (a, b)
        for block in range(0, len(order) - 3, 4):
            members = order[block : block + 4]
            if all(s in complete for s in members):
                pairs = collections.Counter(
                    (c, table[s, group][c]) for s in members for c in CATEGORIES
                )
                assert set(pairs.values()) == {1} and len(pairs) == 16, members


def test_shared_answers_refuse_more_cultures_than_tables():
    assert len(list(synthetic_rows(12, 1, answers="shared"))) == 12
    with pytest.raises(UsageError, match="at most 12"):
        next(synthetic_rows(13, 1, answers="shared"))


def test_each_culture_has_its_own_visual_cue():
    # The most common pixel of an image is its background, drawn in the culture's palette.
    def background(row):
        img = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        return max(img.getcolors(64 * 64))[1]

    by_culture = collections.defaultdict(list)
    for row in synthetic_rows(6, 3):
        by_culture[row["Subset"]].append(background(row))
    centres = {
        s: tuple(sum(ch) / len(ch) for ch in zip(*bgs, strict=True))
        for s, bgs in by_culture.items()
    }
    for s, bgs in by_culture.items():
        for bg in bgs:  # each image is closest to its own culture's mean background
            dist = {
                t: sum((a - b) ** 2 for a, b in zip(bg, c, strict=True)) for t, c in centres.items()
            }
            assert min(dist, key=dist.get) == s
    assert len({c.motif for c in resolve_cultures(6)}) == 6


def test_culture_names_and_words_are_stable():
    named = resolve_cultures(["Aa-Bb", "Cc", ("Dd", "Ee")])
    assert [(c.language, c.country) for c in named] == [("Aa", "Bb"), ("Cc", "Cc"), ("Dd", "Ee")]
    # A culture's words depend on its name only, not on the other cultures.
    assert resolve_cultures(3)[2].words == resolve_cultures(5)[2].words
    assert len(resolve_cultures(len(BUILTIN_CULTURES) + 2)) == len(BUILTIN_CULTURES) + 2
    with pytest.raises(UsageError):
        resolve_cultures(["Aa-Bb", "Aa-Bb"])
    with pytest.raises(UsageError):
        resolve_cultures(0)


def test_hidden_labels():
    assert {row["Label"] for row in synthetic_rows(2, 4, hidden_labels=True)} == {-1}


def test_folder_of_several_files_round_trips(tmp_path):
    folder = write_synthetic_cvqa(tmp_path / "cvqa", cultures=3, items_per_culture=6, num_files=2)
    files = sorted((folder / "data").glob("*.parquet"))
    assert [f.name for f in files] == ["test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]
    assert pq.read_schema(files[1]).metadata == cvqa_arrow_schema().metadata
    data = load_cvqa(folder, min_items=1)
    assert len(data) == 18


def test_in_memory_items_match_the_loaded_parquet(tmp_path):
    path = write_synthetic_cvqa(tmp_path / "c.parquet", cultures=3, items_per_culture=5, seed=2)
    loaded = load_cvqa(path, min_items=1)
    memory = make_synthetic_items(3, 5, seed=2)
    assert loaded.cultures == memory.cultures
    assert list(loaded) == list(memory)  # compares every field except the image reference
    assert [it.image_bytes() for it in loaded] == [it.image_bytes() for it in memory]


def test_image_sizes_vary_within_bounds_and_square_images_stay_as_they_were():
    """A (smallest, largest) pair draws each image's width and height apart from the rest of
    the item (its own stream), so square images are byte for byte those of before; the size
    an item reads from its image's header is the decoded one."""
    data = make_synthetic_items(cultures=2, items_per_culture=6, seed=3, image_size=(20, 90))
    items = [it for c in data.cultures for it in data.items_by_culture[c]]
    sizes = [it.image_size for it in items]
    assert all(20 <= s <= 90 for hw in sizes for s in hw) and len(set(sizes)) > 6
    assert all(it.image_size == (it.image.height, it.image.width) for it in items)
    square = list(synthetic_rows(2, 6, seed=3))
    varied = list(synthetic_rows(2, 6, seed=3, image_size=(20, 90)))
    assert [r["Options"] for r in square] == [r["Options"] for r in varied]
    assert list(synthetic_rows(2, 6, seed=3, image_size=64)) == square
    for bad in (8, (10, 40), (50, 40)):
        with pytest.raises(UsageError, match="image_size"):
            list(synthetic_rows(1, 1, image_size=bad))
