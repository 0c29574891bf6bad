"""Each package keeps to its side of the seams: what one job image runs never reaches into another's package,
the orchestration side (dags/, plugins/, local_stack/) takes only the torch-free contract from ml/, and the
payload never imports Airflow, the stand-in or the ops tools. Read from every import statement, lazy ones too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
OURS = ("ml", "local_stack", "sdxl_lora_ops", "sdxl_lora", "airflow")

# What each package may import of the project (and of Airflow). A package may always import itself.
ALLOWED = {
    "ml.contract": set(),
    "ml.dataset": {"ml.contract"},
    "ml.fixtures": {"ml.contract"},
    "ml.prepare": {"ml.contract", "ml.dataset"},
    "ml.lora": {"ml.contract"},
    "ml.train": {"ml.contract", "ml.dataset", "ml.lora"},
    "ml.serve": {"ml.contract", "ml.lora"},
    "ml.cli": {"ml.contract", "ml.prepare", "ml.train", "ml.serve", "ml.fixtures"},
    "local_stack": {"ml.contract"},
    "sdxl_lora": {"ml.contract", "airflow"},
    "dags": {"ml.contract", "sdxl_lora", "airflow"},
    "sdxl_lora_ops": {"ml.contract", "ml.fixtures", "local_stack", "sdxl_lora"},
}


def package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "plugins":
        return "sdxl_lora"  # plugins/sdxl_lora/ and the UI plugin module beside it
    if parts[0] == "ml":
        return "ml.cli" if parts[1] in ("cli", "__init__") else f"ml.{parts[1]}"
    return parts[0]


def target_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] not in OURS:
        return None
    if parts[0] == "ml":
        return "ml.cli" if len(parts) == 1 or parts[1] == "cli" else f"ml.{parts[1]}"
    return parts[0]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from ml import cli` names a module of the package, `from ml.train import job` one of a subpackage
            found.update(f"{node.module}.{alias.name}" for alias in node.names) if node.module == "ml" \
                else found.add(node.module)
    return found


SOURCES = sorted(p for top in ("ml", "local_stack", "sdxl_lora_ops", "plugins", "dags") for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_stays_inside_its_package_boundary(path):
    package = package_of(path)
    crossing = {m for m in imports(path) if (t := target_of(m)) and t != package and t not in ALLOWED[package]}
    assert not crossing, f"{package} may import only {sorted(ALLOWED[package])} of the project; {path.name} imports {sorted(crossing)}"


def test_the_boundary_check_sees_a_crossing(tmp_path):
    probe = ROOT / "ml" / "serve" / "_probe_boundary.py"
    try:
        probe.write_text("def f():\n    from ml.train import models\n")
        assert {target_of(m) for m in imports(probe)} == {"ml.train"}
        assert "ml.train" not in ALLOWED[package_of(probe)]
    finally:
        probe.unlink()


def test_the_three_images_each_have_one_package():
    from ml.contract.job_images import IMAGE_VERBS

    for verb in IMAGE_VERBS.values():
        assert (ROOT / "ml" / verb / "__init__.py").is_file(), f"the {verb} image's code lives in ml/{verb}/"


def _folder(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools takes a package from: its nearest mapped parent's folder, then its own name's parts."""
    parts = package.split(".")
    for cut in range(len(parts), -1, -1):
        parent = ".".join(parts[:cut])
        if parent in package_dir:
            return ROOT / package_dir[parent] / Path(*parts[cut:])
    return ROOT / Path(*parts)


def test_the_distribution_lists_every_package_of_the_tree_and_nothing_else():
    """pyproject.toml names its packages (dags/ goes in as sdxl_lora_ops.dags, and is no package in the tree): a
    package added to the tree is listed there too, or it would be missing from every install."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, package_dir = set(setuptools["packages"]), setuptools["package-dir"]
    tree = {".".join(p.parent.relative_to(root).parts) for top, root in (("ml", ROOT), ("local_stack", ROOT),
            ("sdxl_lora_ops", ROOT), ("sdxl_lora", ROOT / "plugins")) for p in (root / top).rglob("__init__.py")}
    assert listed == tree | {"ml.train.configs", "sdxl_lora_ops.dags"}
    assert all(_folder(package, package_dir).is_dir() for package in listed)
    assert _folder("sdxl_lora_ops.dags", package_dir) == ROOT / "dags"
    assert [(ROOT / package_dir[""] / f"{module}.py").is_file() for module in setuptools["py-modules"]] == [True]
