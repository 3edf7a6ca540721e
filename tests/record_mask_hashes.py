"""Print the mask hashes of ``tests/test_same_masks.py`` for its EXPECTED table (never run by pytest).

Run it after a change that is meant to move masks: ``python tests/record_mask_hashes.py`` runs the
module's cases with pytest, prints one ``"case": "hash",`` line per case instead of asserting, and
exits non-zero if a case itself failed. Paste the lines over EXPECTED and say why in the commit.
"""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    sys.path.insert(0, HERE)
    import test_same_masks as cases  # the module pytest imports below (same name, cached)

    recorded: dict[str, str] = {}
    cases.check_digest = lambda case, got: recorded.__setitem__(case, got)
    code = pytest.main([os.path.join(HERE, "test_same_masks.py"), "-q", "-p", "no:cacheprovider", "-s"])
    for case, got in sorted(recorded.items()):
        mark = "" if cases.EXPECTED.get(case) == got else "   # changed"
        print(f'    "{case}": "{got}",{mark}')
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
