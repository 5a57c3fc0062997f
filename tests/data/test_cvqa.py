"""The CVQA loader on synthetic CVQA written in CVQA's exact schema, and the culture split."""

from __future__ import annotations

import logging
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from culture_neurons.data import CultureData, Item, load_cvqa, make_synthetic_items
from culture_neurons.data import write_synthetic_cvqa as write
from culture_neurons.data.cvqa import parse_subset
from culture_neurons.data.images import InMemoryImage, ParquetImage
from culture_neurons.data.synthetic import cvqa_arrow_schema, synthetic_rows
from culture_neurons.errors import DataError, UsageError

# Built-in synthetic cultures: Amari-Amaria and Fenn-Amaria share the country Amaria.
FOUR = ["Amari-Amaria", "Borun-Borundi", "Calese-Calesia", "Dunic-Dunmark"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 cultures x 8 items as on the hub: <folder>/data/test-0000i-of-00002.parquet."""
    return write(
        tmp_path_factory.mktemp("cvqa") / "cvqa", cultures=6, items_per_culture=8, num_files=2
    )


def write_rows(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or cvqa_arrow_schema()), path)
    return path


# --- sources ------------------------------------------------------------------------------------


def test_parquet_file_and_folder(tmp_path, folder):
    one = write(tmp_path / "one.parquet", cultures=6, items_per_culture=8)
    from_file, from_folder = load_cvqa(one, min_items=1), load_cvqa(folder, min_items=1)
    assert from_file.cultures == from_folder.cultures
    assert len(from_file) == len(from_folder) == 48
    assert list(from_file) == list(from_folder)
    item = from_folder.items_by_culture["Amari-Amaria"][0]
    assert isinstance(item.image_ref, ParquetImage)  # lazy: decoded on access only
    assert item.image.size == (64, 64) and item.image.mode == "RGB"
    assert from_folder.labels_available and from_folder.skipped == {}


@pytest.mark.parametrize("with_datasets", [True, False], ids=["datasets", "pyarrow-only"])
@pytest.mark.parametrize("as_dict", [False, True], ids=["Dataset", "DatasetDict"])
def test_save_to_disk_folder(tmp_path, folder, monkeypatch, with_datasets, as_dict):
    datasets = pytest.importorskip("datasets")
    files = [str(f) for f in sorted(folder.rglob("*.parquet"))]
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "cache"))
    saved = tmp_path / "saved"
    (datasets.DatasetDict({"test": ds}) if as_dict else ds).save_to_disk(str(saved))
    if not with_datasets:
        monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    data = load_cvqa(saved, min_items=1)
    assert list(data) == list(load_cvqa(folder, min_items=1))
    assert [it.image_bytes() for it in data][:5] == [
        it.image_bytes() for it in load_cvqa(folder, min_items=1)
    ][:5]


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cvqa(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.parquet"):
        load_cvqa(tmp_path / "empty")


def test_no_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="not installed.*path="):
        load_cvqa()
    monkeypatch.undo()
    datasets = pytest.importorskip("datasets", reason="checks the offline hub message")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="afaji/cvqa.*pass path="):
        load_cvqa()


def test_hub_dataset_is_read_from_its_arrow_files(tmp_path, folder, monkeypatch):
    datasets = pytest.importorskip("datasets")
    files = [str(f) for f in sorted(folder.rglob("*.parquet"))]
    hub = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "cache"))
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = load_cvqa(min_items=1)
    assert calls == [("afaji/cvqa", "test")]
    assert list(data) == list(load_cvqa(folder, min_items=1))
    with pytest.raises(DataError, match="not backed by plain Arrow files"):
        monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub.select([0, 1]))
        load_cvqa(min_items=1)


# --- cultures -----------------------------------------------------------------------------------


def test_grouping_pair_vs_country(folder):
    pairs = load_cvqa(folder, min_items=1)
    assert pairs.cultures == sorted(FOUR + ["Elvan-Elvaria", "Fenn-Amaria"])
    countries = load_cvqa(folder, min_items=1, grouping="country")
    assert countries.cultures == ["Amaria", "Borundi", "Calesia", "Dunmark", "Elvaria"]
    assert countries.counts()["Amaria"] == 16  # two languages of one country
    assert {it.language for it in countries.items_by_culture["Amaria"]} == {"Amari", "Fenn"}


def test_min_items_drops_small_cultures(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="culture_neurons.data.cvqa"):
        data = load_cvqa(folder, grouping="country", min_items=10)
    assert data.cultures == ["Amaria"]
    assert data.dropped_cultures == {"Borundi": 8, "Calesia": 8, "Dunmark": 8, "Elvaria": 8}
    assert "Borundi (8)" in caplog.text
    with pytest.raises(DataError, match="min_items"):
        load_cvqa(folder, grouping="country", min_items=100)
    with pytest.raises(DataError, match="Borundi \\(8\\).*lower min_items"):
        load_cvqa(folder, grouping="country", min_items=10, cultures=["Amaria", "Borundi"])


def test_explicit_cultures_and_unknown(folder):
    data = load_cvqa(folder, min_items=1, cultures=["Dunic-Dunmark", "Amari-Amaria"])
    assert data.cultures == ["Amari-Amaria", "Dunic-Dunmark"]
    with pytest.raises(DataError, match="'Japanese-Japan'.*available: Amari-Amaria, Borun"):
        load_cvqa(folder, min_items=1, cultures=["Amari-Amaria", "Japanese-Japan"])


def test_max_items_per_culture(folder):
    data = load_cvqa(folder, min_items=1, max_items_per_culture=3)
    assert set(data.counts().values()) == {3}
    assert list(data) == list(load_cvqa(folder, min_items=1, max_items_per_culture=3))


def test_english_vs_local(folder):
    en = load_cvqa(folder, min_items=1, cultures=["Amari-Amaria"])
    local = load_cvqa(folder, min_items=1, cultures=["Amari-Amaria"], language="local")
    for a, b in zip(en, local, strict=True):
        assert a.id == b.id and a.label == b.label
        assert a.question == a.question_en and a.options == a.options_en
        assert b.question == b.question_local and b.options == b.options_local
        assert a.question != b.question and a.options != b.options
    assert en.items_by_culture["Amari-Amaria"][0].question.startswith("Which")


def test_arguments_checked(folder):
    for kwargs in (
        {"grouping": "region"},
        {"language": "fr"},
        {"on_error": "ignore"},
        {"min_items": 0},
    ):
        with pytest.raises(UsageError):
            load_cvqa(folder, **kwargs)


# --- split --------------------------------------------------------------------------------------


def test_split_disjoint_seeded_stable():
    data = make_synthetic_items(4, 10)
    ident, evaluation = data.split()
    assert ident.cultures == evaluation.cultures == data.cultures
    for c in data.cultures:
        a = {it.id for it in ident.items_by_culture[c]}
        b = {it.id for it in evaluation.items_by_culture[c]}
        assert not a & b and a | b == {it.id for it in data.items_by_culture[c]}
        assert len(a) == len(b) == 5
    again, _ = data.split(seed=0)
    assert list(again) == list(ident)
    other, _ = data.split(seed=1)
    assert list(other) != list(ident)
    # Adding cultures, or reordering items, leaves the other cultures' splits unchanged.
    bigger, _ = make_synthetic_items(6, 10).split()
    for c in data.cultures:  # (ids: the distractors differ with more cultures)
        assert [it.id for it in bigger.items_by_culture[c]] == [
            it.id for it in ident.items_by_culture[c]
        ]
    shuffled = CultureData(
        {c: tuple(reversed(v)) for c, v in data.items_by_culture.items()}, labels_available=True
    )
    assert {it.id for it in shuffled.split()[0]} == {it.id for it in ident}


def test_split_ratio():
    data = make_synthetic_items(2, 10)
    ident, evaluation = data.split(ratio=0.3, seed=3)
    assert set(ident.counts().values()) == {3} and set(evaluation.counts().values()) == {7}
    tiny = make_synthetic_items(1, 2)
    assert [len(part) for part in tiny.split(ratio=0.1)] == [1, 1]  # both sides non-empty
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(UsageError):
            data.split(ratio=bad)


# --- labels -------------------------------------------------------------------------------------


def test_hidden_labels(tmp_path, caplog):
    path = write(tmp_path / "hidden.parquet", cultures=2, items_per_culture=4, hidden_labels=True)
    with caplog.at_level(logging.WARNING, logger="culture_neurons.data.cvqa"):
        data = load_cvqa(path, min_items=1)
    assert not data.labels_available
    assert {it.label for it in data} == {-1} and {it.answer_letter for it in data} == {None}
    assert "accuracy cannot be computed" in caplog.text


def test_mixed_labels(tmp_path, caplog):
    rows = list(synthetic_rows(2, 4))
    rows[1]["Label"] = -1
    path = write_rows(tmp_path / "mixed.parquet", rows)
    with pytest.raises(DataError, match=f"item '{rows[1]['ID']}'.*hidden"):
        load_cvqa(path, min_items=1)
    data = load_cvqa(path, min_items=1, on_error="skip")
    assert data.labels_available and len(data) == 7 and data.skipped == {"hidden_label": 1}


# --- malformed input ----------------------------------------------------------------------------


def test_missing_column(tmp_path):
    schema = cvqa_arrow_schema()
    schema = schema.remove(schema.get_field_index("Subset"))
    rows = [{k: v for k, v in r.items() if k != "Subset"} for r in synthetic_rows(1, 2)]
    path = write_rows(tmp_path / "x.parquet", rows, schema)
    with pytest.raises(
        DataError, match="not CVQA-shaped: missing column\\(s\\) 'Subset'; expected"
    ):
        load_cvqa(path, min_items=1)


def _break(row: dict, case: str) -> None:
    if case == "bad_subset":
        row["Subset"] = "('Japanese', 'Japan'"
    elif case == "bad_image":
        row["image"] = {"bytes": b"\x89PNG not really", "path": "x.png"}
    elif case == "bad_options":
        row["Translated Options"] = row["Translated Options"][:3]
    elif case == "bad_label":
        row["Label"] = 4
    elif case == "missing_field":
        row["Translated Question"] = None


CASES = ["bad_subset", "bad_image", "bad_options", "bad_label", "missing_field"]


@pytest.mark.parametrize("case", CASES)
def test_malformed_item_raises_naming_it(tmp_path, case):
    rows = list(synthetic_rows(2, 4))
    _break(rows[5], case)
    path = write_rows(tmp_path / f"{case}.parquet", rows)
    with pytest.raises(DataError, match=f"item '{rows[5]['ID']}'.*on_error='skip'"):
        load_cvqa(path, min_items=1)


def test_malformed_items_skipped_and_counted(tmp_path, caplog):
    rows = list(synthetic_rows(2, 8))
    for k, case in enumerate(CASES):
        _break(rows[2 * k], case)
    rows.append(dict(rows[-1]))  # a duplicate ID
    path = write_rows(tmp_path / "bad.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="culture_neurons.data.cvqa"):
        data = load_cvqa(path, min_items=1, on_error="skip")
    assert data.skipped == {case: 1 for case in CASES} | {"duplicate_id": 1}
    assert len(data) == 16 - len(CASES)
    assert data.skipped_ids["bad_label"] == (f"item '{rows[6]['ID']}'",)
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "bad_image=1" in warnings[0].getMessage()


def test_missing_id_names_the_row(tmp_path):
    rows = list(synthetic_rows(1, 3))
    rows[2]["ID"] = None
    path = write_rows(tmp_path / "noid.parquet", rows)
    with pytest.raises(DataError, match="item at noid.parquet group 0 row 2 \\(no ID\\)"):
        load_cvqa(path, min_items=1)


def test_parse_subset():
    assert parse_subset("('Japanese', 'Japan')") == ("Japanese", "Japan")
    for bad in ("('Japanese',)", "__import__('os')", "('a', 1)", "", "Japanese-Japan"):
        with pytest.raises(Exception, match="not a \\(language, country\\) pair"):
            parse_subset(bad, "item 'x'")


def test_corrupt_image_on_access_names_the_item():
    item = Item("x1", "A-B", "q?", ("a", "b", "c", "d"), 0, InMemoryImage(b"junk"))
    with pytest.raises(DataError, match="item 'x1'.*cannot be decoded"):
        _ = item.image
