"""The Airflow image's Python set, installed as containers/airflow/Dockerfile installs it, in a clean venv:
every DAG parses, every plugins/ module and the report view import, the torch-free modules the tasks use
at run time work, and no payload package (torch, diffusers, transformers) is there.

It installs Airflow into a fresh venv from the package index (about a minute here), which is the only
way to prove that the image needs nothing of the payload set.
"""

import json
import subprocess
import textwrap
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import importlib, importlib.util, json, os, pkgutil, sys
    root, home = sys.argv[1], sys.argv[2]
    os.environ.update(AIRFLOW_HOME=home, AIRFLOW__CORE__LOAD_EXAMPLES="False")
    sys.path.insert(0, os.path.join(root, "plugins"))  # as Airflow puts its plugins folder on sys.path
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=os.path.join(root, "dags"))
    import sdxl_lora
    failed = {}
    names = [f"sdxl_lora.{m.name}" for m in pkgutil.iter_modules(sdxl_lora.__path__)] + ["sdxl_lora_ui"]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            failed[name] = repr(error)
    # What tasks do at run time in the worker: merge a prepare job's parts, draw an XY sheet.
    from ml.contract import manifest
    from sdxl_lora.report import sheets
    part = {"shard": 0, "shards": 1, "run_key": "k", "version": "v", "input_key": "", "files_found": 1,
            "settings": {"min_images": 1}, "long_captions": None, "latent_cache": None, "rejected": [],
            "images": [{"order": 0, "file_name": "a.png", "source": "a.png", "sha256": "0", "caption_source": "sidecar",
                        "row": {"file_name": "a.png", "text": "t", "bucket": [64, 64]}}]}
    rows, merged = manifest.merge([part])
    sheet = sheets.group({10: [sheets.Cell(0.001, 4, "job", missing="Failed")]}, "a prompt", 0)[0]
    png = sheets.render(sheet, cell=64)
    print(json.dumps({"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids),
                      "failed": failed, "rows": len(rows), "png": png[:4] == b"\\x89PNG",
                      "payload": [m for m in ("torch", "diffusers", "transformers", "peft")
                                  if importlib.util.find_spec(m)]}))
""")


def test_the_airflow_image_set_parses_every_dag_without_the_payload(tmp_path):
    env_dir = tmp_path / "airflow-image"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # --no-compile: the check imports what it needs once; compiling every module of Airflow is a third of the install
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    dockerfile = (ROOT / "containers" / "airflow" / "Dockerfile").read_text()
    airflow = dockerfile.split("apache/airflow:", 1)[1].split("-python", 1)[0]  # the image's Airflow version
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), f"apache-airflow=={airflow}",
                    "-r", str(ROOT / "containers" / "airflow" / "requirements.txt")], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    done = subprocess.run([str(python), "-c", CHECK, str(ROOT), str(tmp_path / "home")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["import_errors"] == {}
    assert {"sdxl_dataset_prepare", "sdxl_lora_grid_search", "sdxl_lora_train", "sdxl_lora_deploy"} <= set(found["dags"])
    assert found["failed"] == {}
    assert found["rows"] == 1 and found["png"] is True
    assert found["payload"] == []
