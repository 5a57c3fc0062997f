"""Build the shipped toy: ``python -m culture_neurons.demo.build``.

Trains the toy of seed 0 with the default recipe (:class:`~culture_neurons.demo.toy.ToyConfig`)
into ``culture_neurons/demo/toy/`` (replacing what is there), records its content hashes in
``toy.json``, runs the default run on it and records its headline numbers in
``headline.json``. Run it after changing the recipe (and bump ``toy.VERSION``), then commit
the folder. ``--headline-only`` reruns just the default run on the shipped toy.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

from culture_neurons.demo.headline import HEADLINE, default_run, headline
from culture_neurons.demo.shipped import SHIPPED, SHIPPED_SEED, content_hashes
from culture_neurons.demo.toy import build_toy, load_toy

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headline-only", action="store_true",
                        help="keep the shipped toy, rerun only the default run")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.headline_only:
        build_toy(SHIPPED_SEED, SHIPPED, force=True)
        t = load_toy(SHIPPED)
        meta = dict(t.metadata, hashes=content_hashes(t.model, t.processor, t.data))
        (SHIPPED / "toy.json").write_text(json.dumps(meta, indent=2) + "\n")
    t = load_toy(SHIPPED)
    with tempfile.TemporaryDirectory() as out:
        results = default_run(t, out)
    HEADLINE.write_text(json.dumps(headline(results), indent=2) + "\n")
    log.info("shipped toy in %s, headline in %s", SHIPPED, HEADLINE)


if __name__ == "__main__":
    main()
