"""The modules plugins/ and local_stack/ share with the payload import no torch stack (the Airflow image
installs the package without it), and the two console scripts do not import each other."""

import json
import subprocess
import sys

SHARED = ["ml.hyperparameters", "ml.metrics", "ml.images", "ml.manifest", "ml.buckets"]
HEAVY = ["torch", "diffusers", "transformers", "peft", "accelerate", "PIL", "numpy", "safetensors"]


def imported_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_shared_modules_import_no_torch_stack():
    modules = imported_after("\n".join(f"import {m}" for m in SHARED))
    assert set(SHARED) <= modules
    assert not {m.split(".")[0] for m in modules} & set(HEAVY)


def test_the_check_sees_a_heavy_import():
    assert "torch" in imported_after("import ml.contract, torch")


def test_container_cli_never_imports_local_stack_and_ops_cli_starts_light():
    assert not any(m.startswith("local_stack") for m in imported_after("import ml.cli; ml.cli.build_parser()"))
    modules = imported_after("import local_stack.cli; local_stack.cli.build_parser()")
    assert not {m.split(".")[0] for m in modules} & set(HEAVY + ["airflow", "sagemaker", "moto"])
