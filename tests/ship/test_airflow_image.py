"""This project installed into an Airflow that is already there, as docs/airflow-deployment.md says (and
containers/airflow/Dockerfile does): in a fresh venv, Airflow and the Amazon provider as a deployment from their
pins has them (the image's Airflow version, constraints.txt's pins), then `pip install '<repo>[airflow]'` with every
dependency. pip changes no package that was there; Airflow finds the plugin by its entry point (`airflow plugins`);
after `sdxl-lora-ops install-dags` every DAG parses in that Airflow (`airflow dags list-import-errors`); every
plugins/ module and the report view import from the installed package, the torch-free modules the tasks use at run
time work, and no payload package (torch, diffusers, transformers) is there.

It installs Airflow into a fresh venv from the package index (about a minute here), which is the only way to prove
that the install leaves an Airflow's packages as they are and needs nothing of the payload set.
"""

import json
import os
import subprocess
import textwrap
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import importlib, importlib.util, json, pkgutil
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag()  # the dags folder of the environment: install-dags' copies
    import sdxl_lora
    failed = {}
    names = [m.name for m in pkgutil.walk_packages(sdxl_lora.__path__, "sdxl_lora.")] + ["sdxl_lora_ui"]
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
    print(json.dumps({"dags": sorted(bag.dag_ids), "import_errors": list(bag.import_errors), "failed": failed,
                      "modules": len(names), "rows": len(rows), "png": png[:4] == b"\\x89PNG", "from": sdxl_lora.__file__,
                      "payload": [m for m in ("torch", "diffusers", "transformers", "peft")
                                  if importlib.util.find_spec(m)]}))
""")


def _versions(python: Path, env: dict) -> dict[str, str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True, env=env, timeout=120)
    return {package["name"].lower().replace("_", "-"): package["version"] for package in json.loads(listed.stdout)}


def test_the_project_installs_into_an_existing_airflow_and_changes_none_of_its_packages(tmp_path):
    env_dir, home, dags = tmp_path / "airflow", tmp_path / "home", tmp_path / "dags"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    # Nothing of this checkout or of the test's own Airflow: what runs there imports the installed package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("AIRFLOW", "SDXL_LORA_"))}
    # No metadata database: the checks parse locally (check_migrations off, so the CLI does not ask for one).
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__PLUGINS_FOLDER=str(home / "plugins"), AIRFLOW__DATABASE__CHECK_MIGRATIONS="False",
               PYTHONWARNINGS="ignore")  # stdout is the commands' JSON alone
    # --no-compile: the checks import what they need once; compiling every module of Airflow is a third of the install
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    dockerfile = (ROOT / "containers" / "airflow" / "Dockerfile").read_text()
    airflow = dockerfile.split("apache/airflow:", 1)[1].split("-python", 1)[0]  # the image's Airflow version
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), f"apache-airflow=={airflow}",
                    "apache-airflow-providers-amazon[aiobotocore]"], check=True, timeout=900, env=env)
    before = _versions(bin_dir / "python", env)

    subprocess.run([*pip, f"{ROOT}[airflow]"], check=True, timeout=600, cwd=tmp_path, env=env)
    after = _versions(bin_dir / "python", env)
    assert {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version} == {}
    assert "sdxl-lora-sagemaker" in after and before["apache-airflow"] == airflow

    def run(*command: str) -> str:
        done = subprocess.run([str(bin_dir / command[0]), *command[1:]], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    written = run("sdxl-lora-ops", "install-dags", "--dags-folder", str(dags)).split()
    assert sorted(Path(p).name for p in written) == sorted(p.name for p in (ROOT / "dags").glob("*.py"))

    plugins = [p for p in json.loads(run("airflow", "plugins", "--output", "json")) if p["name"] == "sdxl_lora_report"]
    assert len(plugins) == 1, plugins
    assert plugins[0]["source"].startswith("sdxl-lora-sagemaker==") and "sdxl_lora_ui:SdxlLoraReportPlugin" in \
        plugins[0]["source"]  # by entry point, from the installed package; the plugins folder is empty
    assert plugins[0]["operator_extra_links"] == ["<sdxl_lora.report.links.GridReportLink object>"]
    assert plugins[0]["external_views"] == []

    errors = run("airflow", "dags", "list-import-errors", "--local", "--output", "json").strip().splitlines()
    assert json.loads(errors[-1]) == [], errors

    found = json.loads(run("python", "-c", CHECK).strip().splitlines()[-1])
    assert found["import_errors"] == []
    assert {"sdxl_dataset_prepare", "sdxl_lora_grid_search", "sdxl_lora_train", "sdxl_lora_deploy"} <= \
        set(found["dags"])
    assert found["failed"] == {} and found["modules"] > 10
    assert found["from"].startswith(str(env_dir))
    assert found["rows"] == 1 and found["png"] is True
    assert found["payload"] == []
