"""scripts/test's bookkeeping: how many tests each run collected, and the verdict on every run.

    python scripts/runs.py collected < output-of-pytest---collect-only-q     # prints the number of tests
    python scripts/runs.py summary RESULTS_DIR                              # the table; exit 1 if a run failed

RESULTS_DIR holds runs.tsv, one line per run, tab-separated:

    name  status  allowed_skips  collected  seconds  note

``status`` is pytest's exit status, ``rig`` for a run whose test rig did not start, or another word for a run
that could not run (an image that did not build); ``note`` says why. Beside
it, ``NAME.xml`` is the run's JUnit XML (``pytest --junitxml``). A run passes only if pytest exited 0, its
JUnit file can be read, at least one test passed, it skipped no more than ``allowed_skips`` tests, and
everything collected ran (passed + failed + errors + skipped >= collected). A run whose rig did not start
fails when CI is true and is listed as "not run" otherwise; any other run that did not run fails.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

COLLECTED = re.compile(r"(\d+)(?:/\d+)? tests? collected|no tests collected")


@dataclass
class Run:
    name: str
    status: str
    allowed_skips: int
    collected: int | None
    seconds: int
    note: str = ""
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    skips: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    verdict: str = ""
    why: str = ""


def collected(output: str) -> int | None:
    """The number of tests ``pytest --collect-only -q`` reports, None if it reports none it can count."""
    matches = COLLECTED.findall(output)
    if not matches:
        return None
    last = matches[-1]
    return int(last) if last else 0


def read_junit(run: Run, path: Path) -> str | None:
    """Fill ``run``'s counts from its JUnit file; None, or why the file cannot be read."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return f"no readable JUnit XML ({exc})"
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for suite in suites:
        for case in suite.iter("testcase"):
            kinds = {child.tag for child in case}
            if kinds & {"failure", "error"}:
                run.failures.append(f"{case.get('classname', '')}::{case.get('name', '')}: {first_line(case)}")
            if "failure" in kinds:
                run.failed += 1
            elif "error" in kinds:
                run.errors += 1
            elif "skipped" in kinds:
                run.skipped += 1
                reason = case.find("skipped")
                message = reason.get("message", "") if reason is not None else ""
                run.skips.append(f"{case.get('classname', '')}::{case.get('name', '')}: {message}")
            else:
                run.passed += 1
    return None


def first_line(case: ET.Element) -> str:
    """The first line of a failed or erroring test case's message (its exception), cut at 300 characters."""
    element = case.find("failure")
    if element is None:
        element = case.find("error")
    message = element.get("message", "") if element is not None else ""
    return (message.strip().splitlines() or ["(no message)"])[0][:300]


def judge(run: Run, results: Path, ci: bool) -> None:
    """Set ``run.verdict`` (ok, FAIL or "not run") and ``run.why``."""
    if run.status == "rig":
        run.verdict, run.why = ("FAIL" if ci else "not run"), run.note or "its test rig did not start"
        return
    if not run.status.isdigit():
        run.verdict, run.why = "FAIL", run.note or f"did not run ({run.status})"
        return
    problems = []
    unreadable = read_junit(run, results / f"{run.name}.xml")
    if unreadable:
        problems.append(unreadable)
    if run.status != "0":
        problems.append("pytest collected no tests (exit 5)" if run.status == "5" else f"pytest exited {run.status}")
    if not unreadable:
        ran = run.passed + run.failed + run.skipped + run.errors
        if run.passed == 0:
            problems.append("no test passed" + (f" (all {run.skipped} skipped)" if run.skipped else ""))
        if run.skipped > run.allowed_skips:
            problems.append(f"{run.skipped} skipped, {run.allowed_skips} allowed")
        if run.collected is None:
            problems.append("could not count the tests it collects")
        elif ran < run.collected:
            problems.append(f"ran {ran} of the {run.collected} tests it collects")
    run.verdict = "FAIL" if problems else "ok"
    run.why = "; ".join(problems)


def load(results: Path) -> list[Run]:
    runs = []
    for line in (results / "runs.tsv").read_text().splitlines():
        if not line.strip():
            continue
        name, status, skips, count, seconds, *note = line.split("\t")
        runs.append(Run(name, status, int(skips or 0), int(count) if count.isdigit() else None,
                        int(seconds or 0), "\t".join(note)))
    return runs


def table(runs: list[Run]) -> str:
    header = ("run", "passed", "failed", "skipped", "errors", "seconds", "verdict")
    rows = [header] + [(r.name, str(r.passed), str(r.failed), str(r.skipped), str(r.errors), str(r.seconds),
                        r.verdict) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for run in runs:
        if run.why:
            lines.append(f"{run.name}: {run.verdict}: {run.why}")
        lines.extend(f"    failed {failure}" for failure in run.failures)
        if run.skipped > run.allowed_skips or (run.skips and run.verdict == "FAIL"):
            lines.extend(f"    skipped {skip}" for skip in run.skips)
    return "\n".join(lines)


def summary(results: Path, ci: bool) -> int:
    runs = load(results)
    for run in runs:
        judge(run, results, ci)
    print(table(runs))
    if not runs:
        print("no run was recorded: that is a failure")
        return 1
    failed = [run.name for run in runs if run.verdict == "FAIL"]
    print(f"scripts/test: {'FAILED: ' + ', '.join(failed) if failed else 'all runs passed'}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["collected"]:
        count = collected(sys.stdin.read())
        print("" if count is None else count)
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        return summary(Path(argv[1]), os.environ.get("CI", "").lower() in ("true", "1", "yes"))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
