"""`make bench-dags`: how long the DAG processor takes to parse the dags folder, and why.

Parses the folder in fresh interpreters (as the DAG processor does per file), reports the median
wall time of the parse and the heaviest modules that parsing imports (`python -X importtime`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARSE = """
import os, sys, time
started = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
imported = time.perf_counter()
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
parsed = time.perf_counter()
assert not bag.import_errors, bag.import_errors
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers", "PIL", "sagemaker"})
print("RESULT", len(bag.dags), imported - started, parsed - imported, ",".join(heavy))
"""


def _env(home: str) -> dict:
    return {**os.environ, "AIRFLOW_HOME": home, "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])}


def parse_once(env: dict) -> tuple[int, float, float, str]:
    done = subprocess.run([sys.executable, "-c", PARSE], env=env, capture_output=True, text=True, check=True)
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT"))
    _, count, imported, parsed, heavy = (line.split(" ") + [""])[:5]
    return int(count), float(imported), float(parsed), heavy


def heaviest_imports(env: dict, top: int) -> list[tuple[float, str]]:
    """Cumulative import time of the modules the DAG files pull in beyond Airflow's own start-up."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", PARSE], env=env, capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
            if cumulative.isdigit() and not name.startswith(" "):
                rows.append((int(cumulative) / 1e6, name))
    return sorted(rows, reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        env = _env(home)
        runs = [parse_once(env) for _ in range(args.repeats)]
        imports = heaviest_imports(env, args.top)
    count, heavy = runs[0][0], runs[0][3]
    parse_seconds = statistics.median(r[2] for r in runs)
    airflow_seconds = statistics.median(r[1] for r in runs)
    print(f"{count} DAGs in {ROOT / 'dags'}; median of {args.repeats} fresh interpreters:")
    print(f"  importing Airflow's DagBag: {airflow_seconds:.3f} s")
    print(f"  parsing the dags folder:    {parse_seconds:.3f} s")
    print(f"  heavy modules imported:     {heavy or 'none'}")
    print("heaviest top-level imports (cumulative seconds, one run with -X importtime):")
    for seconds, name in imports:
        print(f"  {seconds:7.3f}  {name}")
    if args.json:
        args.json.write_text(json.dumps({"dags": count, "parse_seconds": parse_seconds,
                                         "airflow_import_seconds": airflow_seconds, "heavy_modules": heavy,
                                         "imports": imports}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
