"""CVQA's schema (``afaji/cvqa``, one ``test`` split) and the loader's vocabulary for it.

    image  ID  Subset  Question  Translated Question  Options  Translated Options
    Label  Category  Image Type  Image Source  License

``image`` is a struct ``{bytes, path}``, ``Subset`` a string such as ``"('Japanese', 'Japan')"``,
``Options`` / ``Translated Options`` lists of 4 strings (local language / English) and
``Label`` the index 0-3 of the right option, or -1 where the public copy hides it.
"""

CVQA_COLUMNS = (
    "image",
    "ID",
    "Subset",
    "Question",
    "Translated Question",
    "Options",
    "Translated Options",
    "Label",
    "Category",
    "Image Type",
    "Image Source",
    "License",
)
# The loader needs these; the last four are metadata and may be absent from derived copies.
REQUIRED_COLUMNS = CVQA_COLUMNS[:8]
NUM_OPTIONS = 4
LETTERS = "ABCD"
HIDDEN_LABEL = -1
HUB_NAME = "afaji/cvqa"

GROUPINGS = ("pair", "country")
LANGUAGES = ("en", "local")
ON_ERROR = ("raise", "skip")

# Why an item can be skipped with on_error="skip" (keys of CultureData.skipped).
SKIP_REASONS = (
    "missing_field",  # ID, Subset, the chosen language's question/options, Label or image empty
    "bad_subset",  # Subset is not a (language, country) pair
    "bad_image",  # the image bytes cannot be read by PIL
    "bad_options",  # not a list of 4 strings
    "bad_label",  # not an integer in -1..3
    "duplicate_id",  # a later row with an ID seen before (the first one is kept)
    "hidden_label",  # Label -1 among labelled items (see the module docstring)
)
