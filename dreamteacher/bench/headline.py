"""The README's results tables: short tables of committed results.json files, kept in the README
between markers (one block per results file) and regenerated with
`python -m dreamteacher.bench.headline [README]`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dreamteacher.bench.report import FRACTION_LABEL, FRACTION_ORDER, _minutes, _row_keys, eval_set_names, summarize
from dreamteacher.core.runs import write_text_atomic

HEADLINE_BEGIN, HEADLINE_END = "<!-- headline: generated from {} by `python -m dreamteacher.bench.headline` -->", \
    "<!-- /headline -->"
BLOCK = re.compile(r"<!-- headline: generated from (\S+) by `python -m dreamteacher.bench.headline` -->")


def headline(results: dict, fractions: tuple[str, ...] = FRACTION_ORDER) -> str:
    """The short table of a results.json for a README: each row's mean mIoU at every label fraction
    on every evaluation set, with its pretraining wall-clock."""
    rows = results["rows"]
    names = eval_set_names(results, rows)
    shown = [f for f in FRACTION_ORDER if f in fractions and any(r["fraction"] == f for r in rows)]
    means = {name: {(s["method"], s["head"], s["fraction"]): s for s in summarize(rows, name)} for name in names}
    header = "| method | head | pretraining | " + " | ".join(
        f"{FRACTION_LABEL[f]} `{name}`" for name in names for f in shown) + " |"
    lines = [header, "|---|---|---|" + "---|" * (len(names) * len(shown))]
    for method, head in _row_keys(summarize(rows)):
        first = next(s for s in summarize(rows) if (s["method"], s["head"]) == (method, head))
        cells = []
        for name in names:
            for f in shown:
                s = means[name].get((method, head, f))
                cells.append("" if s is None else f"{s['mean']:.1f}")
        lines.append(f"| {method} | {head} | {_minutes(first['pretrain_seconds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, root: Path | None = None) -> bool:
    """Rewrites every headline block of `readme` from the results file its marker names (relative to
    `root`, the repository: by default the README's folder); True when anything changed."""
    root = root or readme.parent
    text = readme.read_text()
    new = text
    for match in reversed(list(BLOCK.finditer(text))):
        start, end = match.end(), new.index(HEADLINE_END, match.end())
        table = headline(json.loads((root / match.group(1)).read_text()))
        new = new[:start] + "\n" + table + new[end:]
    if new != text:
        write_text_atomic(readme, new)
    return new != text


if __name__ == "__main__":  # python -m dreamteacher.bench.headline [README]
    import sys

    readme_path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    print(f"{readme_path}: {'updated' if update_readme(readme_path) else 'unchanged'}")
