"""A markdown section of benchmark tables, printed as it grows and written between its own markers of a file."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


class Report:
    """The section ``key`` (``"<device> <model>"``) of a benchmark page.

    :meth:`write` replaces the text between ``<!-- benchmark: key -->`` and ``<!-- end benchmark: key -->`` in the
    file, or inserts the section after the page's introduction and its other benchmark sections, before its first
    study (``##`` heading), when the markers are not there yet; the rest of the page (hand-written studies) stays
    as it is.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.parts: list[str] = [f"## Speed and memory: {key}"]

    def _add(self, text: str) -> None:
        self.parts.append(text)
        print(f"\n{text}", flush=True)

    def line(self, text: str) -> None:
        self._add(text)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        self._add("\n".join(lines))

    def code(self, title: str, text: str) -> None:
        self._add(f"**{title}**\n\n```\n{text.rstrip()}\n```")

    def write(self, path: Path) -> None:
        start, end = f"<!-- benchmark: {self.key} -->", f"<!-- end benchmark: {self.key} -->"
        section = f"{start}\n" + "\n\n".join(self.parts) + f"\n{end}"
        page = path.read_text() if path.exists() else "# Benchmarks\n"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if pattern.search(page):
            page = pattern.sub(lambda _: section, page)
        else:  # after the introduction and the other benchmark sections, before the first study
            after = page.rfind("<!-- end benchmark: ")
            cut = page.find("\n## ", max(after, 0))
            cut = len(page) if cut < 0 else cut
            page = f"{page[:cut].rstrip()}\n\n{section}\n{page[cut:]}"
        path.write_text(page)
