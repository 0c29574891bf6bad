"""`sdxl-lora-ops install-dags` (sdxl_lora_ops/install_dags.py): the DAG files into an Airflow's DAGs folder.
From an installed package: tests/ship/test_airflow_image.py."""

from pathlib import Path

from sdxl_lora_ops import cli, install_dags

ROOT = Path(__file__).resolve().parents[2]


def test_install_dags_copies_every_dag_file_replaces_old_copies_and_keeps_the_rest(tmp_path, capsys):
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "sdxl_lora_train.py").write_text("# an older copy\n")
    (folder / "their_own_dag.py").write_text("# someone else's DAG\n")
    assert cli.main(["install-dags", "--dags-folder", str(folder)]) == 0
    shipped = sorted((ROOT / "dags").glob("*.py"))
    assert [Path(line) for line in capsys.readouterr().out.split()] == [folder / p.name for p in shipped]
    for source in shipped:
        assert (folder / source.name).read_bytes() == source.read_bytes()
    assert (folder / "their_own_dag.py").read_text() == "# someone else's DAG\n"


def test_install_dags_makes_a_missing_folder(tmp_path):
    written = install_dags.install(tmp_path / "new" / "dags")
    assert [p.name for p in written] == [p.name for p in install_dags.dag_files()] and all(p.is_file() for p in written)
