"""The README's results table: a short table of a committed results.json, kept in the README between
markers and regenerated with `python -m dreamteacher.bench.headline [README] [RESULTS]`."""

from __future__ import annotations

import json
from pathlib import Path

from dreamteacher.bench.report import FRACTION_LABEL, FRACTION_ORDER, _minutes, _row_keys, eval_set_names, summarize
from dreamteacher.core.runs import write_text_atomic


HEADLINE_BEGIN, HEADLINE_END = "<!-- headline: generated from {} by `python -m dreamteacher.bench.headline` -->", \
    "<!-- /headline -->"


def headline(results: dict, fractions: tuple[str, ...] = ("1-30", "1-8")) -> str:
    """The short table of a results.json for a README: each row's mean mIoU at the first label
    fractions on every evaluation set, with its pretraining wall-clock."""
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


def update_readme(readme: Path, results_file: Path) -> bool:
    """Rewrites the headline block of `readme` from `results_file`; True when it changed."""
    begin = HEADLINE_BEGIN.format(results_file)
    text = readme.read_text()
    start, end = text.index(begin) + len(begin), text.index(HEADLINE_END)
    new = text[:start] + "\n" + headline(json.loads(results_file.read_text())) + text[end:]
    if new != text:
        write_text_atomic(readme, new)
    return new != text


if __name__ == "__main__":  # python -m dreamteacher.bench.headline [README] [RESULTS]
    import sys

    readme_path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    results_path = Path(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results/camvid-cpu/results.json")
    print(f"{readme_path}: {'updated' if update_readme(readme_path, results_path) else 'unchanged'}")
