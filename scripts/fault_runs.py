"""Run the broker-fault tests (tests/integration/test_faults.py) several times in a row.

    scripts/stack run -- .venv/bin/python scripts/fault_runs.py [--runs 10] [-k EXPR]

Each run is one pytest process over the whole file (the stack stays up between runs). Writes
``bench/results/faults.md`` and ``faults.json``: per test, the runs passed, the duplicates each
run's reader counted, the measured recovery times, and the CPU the runs were made on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TESTS = "tests/integration/test_faults.py"


def cpu() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model in ("unknown", "", "x86_64"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1]
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")

    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": [f for f in wanted if f in flags.split()],
    }


def one_run(n: int, keyword: str | None, workdir: Path) -> dict[str, Any]:
    xml = workdir / f"run-{n}.xml"
    cmd = [sys.executable, "-m", "pytest", TESTS, "-q", "-p", "no:cacheprovider", "-m", "",
           "-o", "junit_logging=system-out", f"--junitxml={xml}"]  # fmt: skip
    if keyword:
        cmd += ["-k", keyword]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    (workdir / f"run-{n}.log").write_text(out)
    tests: dict[str, dict[str, Any]] = {}
    printed: list[str] = []
    cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else iter(())
    if not xml.exists():
        tests["(pytest ended before reporting)"] = {"passed": False, "seconds": 0.0,
                                                    "duplicates": []}  # fmt: skip
    for case in cases:
        printed.append(case.findtext("system-out") or "")
        failed = case.find("failure") is not None or case.find("error") is not None
        tests[case.get("name", "?")] = {
            "passed": not failed and case.find("skipped") is None,
            "seconds": float(case.get("time", "0")),
            "duplicates": [int(d) for d in re.findall(r"(\d+) duplicates", printed[-1])],
        }
    text = "".join(printed)
    recoveries = [float(x) for x in re.findall(r"recovery: ([\d.]+) s", text)]
    resumed: dict[str, list[float]] = defaultdict(list)
    for what, took in re.findall(r"\n(.+): first new result ([\d.]+) s later", text):
        resumed[what].append(float(took))
    return {"run": n, "exit": proc.returncode, "seconds": time.monotonic() - started,
            "tests": tests, "recovery_s": recoveries, "resumed_s": resumed}  # fmt: skip


def _revision() -> str:
    """The commit the runs tested, marked when the work tree differed from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)  # fmt: skip
    name = head.stdout.strip() or "unknown"
    return f"commit {name}" + (" with uncommitted changes" if dirty.stdout.strip() else "")


def write(runs: list[dict[str, Any]], argv: list[str]) -> None:
    info = cpu()
    per_test: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        for name, t in r["tests"].items():
            per_test[name].append(t)
    recoveries = [x for r in runs for x in r["recovery_s"]]
    lines = [
        "# Broker faults, run again and again",
        "",
        f"Command: `scripts/stack run -- .venv/bin/python scripts/fault_runs.py {' '.join(argv)}`",
        f"Code: {_revision()}.",
        f"CPU: {info['model']}, {info['cores']} cores, flags {', '.join(info['flags']) or '-'}; "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| test | runs passed | duplicates seen per run | median s |",
        "|---|---|---|---|",
    ]
    for name, ts in sorted(per_test.items()):
        passed = sum(t["passed"] for t in ts)
        dups = ",".join(str(sum(t["duplicates"])) for t in ts)
        secs = sorted(t["seconds"] for t in ts)[len(ts) // 2]
        lines.append(f"| `{name}` | {passed}/{len(ts)} | {dups} | {secs:.0f} |")
    resumed: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        for what, values in r.get("resumed_s", {}).items():
            resumed[what] += values
    for what, values in sorted(resumed.items()):
        listed = ", ".join(f"{x:.1f}" for x in values)
        lines += ["", f"{what}, to the first new result: {listed} s (max {max(values):.1f} s)."]
    if recoveries:
        lines += ["", "Restart with the same instance id, restart to first new result: "
                  + ", ".join(f"{x:.1f}" for x in recoveries) + " s "
                  + f"(max {max(recoveries):.1f} s)."]  # fmt: skip
    lines += ["", "Duplicates are what the `read_committed` reader counted (the same task at two "
              "offsets); exactly_once tests fail on any, at_least_once tests on more than was in "
              "flight.", ""]  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.md").write_text("\n".join(lines))
    (RESULTS / "faults.json").write_text(json.dumps({"cpu": info, "runs": runs}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    args = parser.parse_args()
    workdir = ROOT / ".fault-runs"
    workdir.mkdir(exist_ok=True)
    runs = []
    for n in range(1, args.runs + 1):
        result = one_run(n, args.keyword, workdir)
        runs.append(result)
        bad = [k for k, t in result["tests"].items() if not t["passed"]]
        print(f"run {n}/{args.runs}: exit {result['exit']} in {result['seconds']:.0f} s"
              + (f", failed: {bad}" if bad else ""), flush=True)  # fmt: skip
        write(runs, sys.argv[1:])
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
