"""Short culture-specific sentences from Faker's locale providers (the ``lm`` task's data).

Each culture is one Faker locale. Its sentences fill templates written in the locale's own
language with the locale's own person names, cities, companies, phone numbers and addresses,
so each culture has its own script, naming conventions and number formats:

    ja_JP  前田 舞さんは富津市に住んでいます。
    de_DE  Nurten Linke-Benthin arbeitet bei Lachmann Ziegert GmbH.

A template uses only the fields that the locale's provider writes natively (e.g. tr_TR's
``city()`` falls back to English "-port" names, so Turkish templates leave cities out).
Everything is deterministic from ``seed`` (for one installed Faker version: Faker's own data
may change between releases, which is why the version is part of ``CultureData.source``).
The per-culture identification / evaluation split is ``CultureData.split``, as for CVQA.
"""

from __future__ import annotations

from dataclasses import dataclass

from culture_neurons.data.items import CultureData, stable_seed
from culture_neurons.errors import DataError, UsageError

# Templates per language; {name} {city} {company} {phone} {address} are Faker fields.
_JA = ("{name}さんは{city}に住んでいます。", "{name}さんは{company}で働いています。",
       "{name}さんの電話番号は{phone}です。", "{company}の本社は{city}にあります。")  # fmt: skip
_ZH = ("{name}住在{city}。", "{name}在{company}工作。", "{name}的电话号码是{phone}。",
       "{company}的总部位于{city}。")  # fmt: skip
_KO = ("{name} 씨는 {city}에 삽니다.", "{name} 씨는 {company}에서 일합니다.",
       "{name} 씨의 전화번호는 {phone}입니다.", "{name} 씨의 주소는 {address}입니다.")  # fmt: skip
_HI = ("{name} {city} में रहते हैं।", "{name} {company} में काम करते हैं।",
       "{name} का फ़ोन नंबर {phone} है।")  # fmt: skip
_BN = ("{name} {city}-এ থাকেন।", "{name} {company}-এ কাজ করেন।", "{name}-এর ফোন নম্বর {phone}।")
_TH = ("{name} อาศัยอยู่ที่{city}", "{name} ทำงานที่{company}",
       "หมายเลขโทรศัพท์ของ{name}คือ {phone}")  # fmt: skip
_VI = ("{name} sống ở {city}.", "{name} làm việc tại {company}.",
       "Số điện thoại của {name} là {phone}.")  # fmt: skip
_ID = ("{name} tinggal di {city}.", "{name} bekerja di {company}.",
       "Nomor telepon {name} adalah {phone}.", "Alamat {name} adalah {address}.")  # fmt: skip
_AR = ("{name} يعمل في {company}.", "التقى {name} بمدير {company}.")
_FA = ("{name} در {city} زندگی می‌کند.", "{name} در {company} کار می‌کند.",
       "شماره تلفن {name} {phone} است.", "نشانی {name} {address} است.")  # fmt: skip
_HE = ("{name} גר ב{city}.", "{name} עובד ב{company}.", "מספר הטלפון של {name} הוא {phone}.",
       "הכתובת של {name} היא {address}.")  # fmt: skip
_TR = ("{name}, {company} şirketinde çalışıyor.", "{name} dün {company} ile görüştü.")
_RU = ("{name} работает в компании {company}.", "Телефон: {phone}, контакт: {name}.",
       "Адрес: {city}, {address}. Получатель: {name}.")  # fmt: skip
_UK = ("{name} працює в компанії {company}.", "Телефон: {phone}, контакт: {name}.",
       "Адреса: {city}, {address}. Отримувач: {name}.")  # fmt: skip
_PL = ("{name} mieszka w mieście {city}.", "{name} pracuje w firmie {company}.",
       "Kontakt: {name}, tel. {phone}.", "Adres: {address}, {city}.")  # fmt: skip
_DE = ("{name} wohnt in {city}.", "{name} arbeitet bei {company}.",
       "Die Telefonnummer von {name} ist {phone}.", "Die Adresse lautet {address}, {city}.")
_FR = ("{name} habite à {city}.", "{name} travaille chez {company}.",
       "Le numéro de téléphone de {name} est le {phone}.", "L'adresse est {address}, {city}.")
_ES = ("{name} vive en {city}.", "{name} trabaja en {company}.",
       "El teléfono de {name} es {phone}.", "La dirección es {address}, {city}.")  # fmt: skip
_IT = ("{name} abita a {city}.", "{name} lavora presso {company}.",
       "Il numero di telefono di {name} è {phone}.", "L'indirizzo è {address}, {city}.")
_NL = ("{name} woont in {city}.", "{name} werkt bij {company}.",
       "Het telefoonnummer van {name} is {phone}.", "Het adres is {address}, {city}.")
_SV = ("{name} bor i {city}.", "{name} arbetar på {company}.",
       "Telefonnumret till {name} är {phone}.", "Adressen är {address}, {city}.")  # fmt: skip
_EL = ("{name} μένει στην πόλη {city}.", "{name} εργάζεται στην εταιρεία {company}.",
       "Τηλέφωνο επικοινωνίας ({name}): {phone}.", "Διεύθυνση: {address}, {city}.")  # fmt: skip
_PT = ("{name} mora em {city}.", "{name} trabalha na {company}.",
       "O telefone de {name} é {phone}.", "O endereço é {address}, {city}.")  # fmt: skip
_SW = ("{name} anafanya kazi katika kampuni ya {company}.", "{name} ni mfanyakazi wa {company}.")

TEMPLATES: dict[str, tuple[str, ...]] = {
    # Asia
    "ja_JP": _JA, "zh_CN": _ZH, "ko_KR": _KO, "hi_IN": _HI, "bn_BD": _BN, "th_TH": _TH,
    "vi_VN": _VI, "id_ID": _ID,
    # Middle East
    "ar_SA": _AR, "fa_IR": _FA, "he_IL": _HE, "tr_TR": _TR,
    # Europe
    "ru_RU": _RU, "uk_UA": _UK, "pl_PL": _PL, "de_DE": _DE, "fr_FR": _FR, "es_ES": _ES,
    "it_IT": _IT, "nl_NL": _NL, "sv_SE": _SV, "el_GR": _EL,
    # Americas
    "es_MX": _ES, "pt_BR": _PT,
    # Africa
    "sw": _SW,
}  # fmt: skip
LOCALES: tuple[str, ...] = tuple(TEMPLATES)

# The dominant Unicode script of each locale's sentences, for tests and sanity checks.
SCRIPTS: dict[str, str] = {
    "ja_JP": "CJK", "zh_CN": "CJK", "ko_KR": "HANGUL", "hi_IN": "DEVANAGARI",
    "bn_BD": "BENGALI", "th_TH": "THAI", "ar_SA": "ARABIC", "fa_IR": "ARABIC",
    "he_IL": "HEBREW", "ru_RU": "CYRILLIC", "uk_UA": "CYRILLIC", "el_GR": "GREEK",
}  # fmt: skip


@dataclass(frozen=True)
class TextItem:
    """One sentence of one culture (the ``lm`` task's item): no question, no answer key."""

    id: str  # "<locale>-<index>", unique in the data
    culture: str  # the Faker locale, e.g. "ja_JP"
    text: str


def _fields(fake) -> dict[str, str]:
    """One draw of every template field; multi-line addresses become one line."""
    return {
        "name": fake.name(),
        "city": fake.city(),
        "company": fake.company(),
        "phone": fake.phone_number(),
        "address": fake.street_address().replace("\n", ", "),
    }


def sentences(locale: str, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences of ``locale``, templates used in turn (so each split half
    holds every template); deterministic from ``(seed, locale)``."""
    from faker import Faker

    if locale not in TEMPLATES:
        raise UsageError(f"no templates for locale {locale!r}; choose from {', '.join(LOCALES)}")
    templates = TEMPLATES[locale]
    fake = Faker(locale)
    fake.seed_instance(stable_seed("faker_text", seed, locale))
    for provider in fake.providers:
        # it_IT's address provider lists its cities from a set (faker's it_IT getcities), so
        # their order, and every city drawn, followed the process's string hashing
        # (PYTHONHASHSEED): another process gave other data. Sorted, only the seed decides.
        if hasattr(provider, "cap_city_province"):
            provider.cities = sorted(provider.cities)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * n):  # distinct draws; the bound only guards a degenerate provider
        if len(out) == n:
            break
        text = templates[len(out) % len(templates)].format(**_fields(fake))
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < n:
        raise DataError(f"Faker's {locale} provider gave only {len(out)} distinct sentences "
                        f"of the {n} asked; ask for fewer sentences per culture")  # fmt: skip
    return out


def make_faker_data(locales: list[str] | tuple[str, ...] | None = None,
                    per_culture: int = 16, seed: int = 0) -> CultureData:  # fmt: skip
    """A ``CultureData`` of ``TextItem``s: ``per_culture`` sentences of each locale (default:
    every locale of ``LOCALES``). ``labels_available`` is False: sentences have no answer key."""
    try:
        import faker
    except ModuleNotFoundError as e:
        raise DataError("the faker data needs the 'faker' package; pip install faker") from e
    locales = list(LOCALES if locales is None else locales)
    if per_culture < 2:
        raise UsageError(f"per_culture={per_culture} leaves nothing to split; give at least 2")
    if not locales:
        raise UsageError("no locale given; name some of " + ", ".join(LOCALES))
    if len(set(locales)) != len(locales):
        raise UsageError(f"locales {locales} name one locale twice")
    groups = {
        loc: tuple(TextItem(f"{loc}-{i:04d}", loc, text)
                   for i, text in enumerate(sentences(loc, per_culture, seed)))
        for loc in locales
    }  # fmt: skip
    return CultureData(groups, labels_available=False, grouping="locale", language="local",
                       source=f"faker {faker.VERSION} seed={seed} sentences={per_culture}")  # fmt: skip
