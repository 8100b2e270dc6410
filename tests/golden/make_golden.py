"""Write tests/golden/selection/<case>.json: the reduced selection-log rows of each golden case.

Run it from a checkout of the commit whose behaviour is to be frozen, e.g. a detached worktree:

    git worktree add --detach /tmp/golden-base <commit>
    PYTHONPATH=/tmp/golden-base:/tmp/golden-base/kernels:tests \
        python tests/golden/make_golden.py --expect-root /tmp/golden-base [case ...]

(``tests`` on the path for golden_selection_cases and helpers_tiny, from this checkout.)

It prints where irtuning_plugin and irtuning_kernels were imported from; with --expect-root it refuses
to write anything unless both come from under that folder. A resume case is only written when its rows
equal those of its uninterrupted base case (the resume promise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

OUT = HERE / "selection"


def _commit_of(root: Path) -> str:
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "irtuning_plugin", "kernels"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return head.stdout.strip() + ("+uncommitted" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="cases to write (default: all)")
    parser.add_argument("--expect-root", type=Path, help="irtuning_plugin and irtuning_kernels must import from here")
    args = parser.parse_args(argv)

    from golden_selection_cases import CASES, case_settings, run_case

    import irtuning_kernels
    import irtuning_plugin

    sources = {"irtuning_plugin": Path(irtuning_plugin.__file__).resolve(),
               "irtuning_kernels": Path(irtuning_kernels.__file__).resolve()}
    for mod, path in sources.items():
        print(f"{mod}: {path}")
    root = Path(irtuning_plugin.__file__).resolve().parent.parent
    if args.expect_root is not None:
        expect = args.expect_root.resolve()
        wrong = [f"{m} from {p}" for m, p in sources.items() if not p.is_relative_to(expect)]
        if wrong:
            sys.exit(f"make_golden: imported {', '.join(wrong)}, not from under --expect-root {expect}")
    commit = _commit_of(root)
    print(f"commit: {commit}")

    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"make_golden: unknown case(s) {unknown}; known: {', '.join(CASES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            base = case_settings(name).get("base")
            if base and base not in results:
                results[base] = run_case(base, tmp)
            results[name] = run_case(name, tmp)
            if base and results[name] != results[base]:
                sys.exit(f"make_golden: {name}: the resumed run's rows differ from {base}'s; nothing written for it")
            steps = [r["step"] for r in results[name]]
            if steps != list(range(1, len(steps) + 1)) or not steps:
                sys.exit(f"make_golden: {name}: logged steps {steps}")
    for name in names:
        head = {"case": name, "commit": commit, "settings": case_settings(name)}
        rows = ",\n".join("  " + json.dumps(row) for row in results[name])  # one row per line: readable diffs
        text = json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"
        json.loads(text)
        (OUT / f"{name}.json").write_text(text, encoding="utf-8")
        print(f"wrote {OUT / name}.json ({len(results[name])} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
