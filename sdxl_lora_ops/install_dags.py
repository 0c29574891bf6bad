"""`sdxl-lora-ops install-dags`: the project's DAG files into the DAGs folder of an Airflow that has the package.

The DAG files travel in the package (sdxl_lora_ops/dags/ once installed; dags/ beside this package in a checkout
or an editable install), so the DAGs an Airflow parses are those of the plugins library installed with them. The
plugin needs no copy: Airflow loads it from the package's entry point.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def dag_files() -> list[Path]:
    """The DAG files of this installation: the installed package's copy, else the checkout's dags/."""
    for folder in (HERE / "dags", HERE.parent / "dags"):
        found = sorted(folder.glob("*.py"))
        if found:
            return found
    raise FileNotFoundError(f"no DAG files in {HERE / 'dags'} or {HERE.parent / 'dags'}: reinstall the package")


def install(dags_folder: Path) -> list[Path]:
    """Copy every DAG file into dags_folder (made when missing), replacing earlier copies; the folder's other
    files stay. Returns the files written."""
    dags_folder.mkdir(parents=True, exist_ok=True)
    written = []
    for source in dag_files():
        target = dags_folder / source.name
        shutil.copyfile(source, target)
        written.append(target)
    return written


def main(args) -> int:
    for path in install(Path(args.dags_folder)):
        print(path)
    return 0
