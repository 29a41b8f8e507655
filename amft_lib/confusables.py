"""Homoglyph folding for dedup and contamination keys: the Unicode TR39 "skeleton", adapted.

Why: a copy of a question with Cyrillic `а`/`е`/`о` in place of Latin `a`/`e`/`o` looks identical
to a person and to most tokenizers' output, but NFKC leaves it alone, so it got its own key, its own
split, and leaked evaluation questions into training. TR39 §4 defines skeleton(X) as the string with
every character replaced by the prototype of its confusable class (confusables.txt); two strings are
confusable when their skeletons are equal. The table comes from the pinned `confusable-homoglyphs`
package (Unicode's confusables.txt as JSON), not from a list kept here.

Adapted in one way, on purpose: ASCII maps to itself. Full TR39 also folds ASCII into ASCII
(`0` → `O`, `1` → `l`, `m` → `rn`), which would merge "10 apples" with "lO apples" but, worse, change
the key of every existing all-ASCII dataset and so its splits. Here only non-ASCII characters fold,
to an ASCII member of their class when there is one (`а` → `a`, `ο` → `o`, `𝐚` → `a`), else to one
fixed member; all-ASCII text keeps exactly the key it had before.
"""

from __future__ import annotations

import functools
import unicodedata


@functools.cache
def _table() -> dict[int, str]:
    """ord(non-ASCII char) → its replacement; built once per process (~9.6k entries, ~50 ms)."""
    from confusable_homoglyphs.confusables import confusables_data  # 900 KB JSON: load on first use only

    parent: dict[str, str] = {}

    def find(c: str) -> str:
        parent.setdefault(c, c)
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for char, entries in confusables_data.items():
        for entry in entries:
            other = entry["c"]
            if len(char) == 1 and len(other) == 1:
                parent[find(char)] = find(other)
    members: dict[str, list[str]] = {}
    for c in list(parent):
        members.setdefault(find(c), []).append(c)

    table: dict[int, str] = {}
    for char, entries in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        # A source character lists exactly its prototype; take it when it is ASCII (also "rn"-like sequences).
        if len(entries) == 1 and entries[0]["c"].isascii():
            table[ord(char)] = entries[0]["c"]
            continue
        cls = members.get(find(char), [char])
        ascii_members = sorted(m for m in cls if m.isascii())
        rep = ascii_members[0] if ascii_members else min(cls)
        if rep != char:
            table[ord(char)] = rep
    return table


def skeleton(text: str) -> str:
    """NFKC, casefold, then every non-ASCII confusable replaced by its class representative.

    skeleton("Whаt is 2+2?") with a Cyrillic `а` == skeleton("what is 2+2?"). ASCII text only
    gets NFKC + casefold (= lower()), so keys of ASCII data do not change.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", text.translate(_table())).casefold()
