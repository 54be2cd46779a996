"""Print line coverage per layer (the package's folders: core, feedback, train, loop, serve, and
the CLI in tuneloop/) from coverage's JSON report:
`python .ci/coverage_by_layer.py coverage.json`."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(report: str) -> int:
    files = json.loads(Path(report).read_text())["files"]
    covered: dict[str, int] = defaultdict(int)
    statements: dict[str, int] = defaultdict(int)
    for name, data in files.items():
        layer = Path(name).parts[0] if len(Path(name).parts) > 1 else "."
        covered[layer] += data["summary"]["covered_lines"]
        statements[layer] += data["summary"]["num_statements"]
    print(f"{'layer':<10} {'lines':>7} {'covered':>8}")
    for layer in sorted(statements):
        share = covered[layer] / statements[layer] if statements[layer] else 1.0
        print(f"{layer:<10} {statements[layer]:>7} {share:>8.1%}")
    total = sum(statements.values())
    print(f"{'all':<10} {total:>7} {sum(covered.values()) / total:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
