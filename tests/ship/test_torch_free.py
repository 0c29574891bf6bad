"""The contract plugins/ and local_stack/ share with the payload (every module of ml.contract) imports no torch
stack (the Airflow image installs the package without it), and the two console scripts do not import each other."""

import json
import subprocess
import sys
from pathlib import Path

CONTRACT = Path(__file__).parents[2] / "ml" / "contract"
SHARED = sorted(f"ml.contract.{p.stem}" for p in CONTRACT.glob("*.py") if p.stem != "__init__")
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
    assert "torch" in imported_after("import ml.contract.container, torch")


def test_the_contract_is_every_shared_module():
    assert {"ml.contract.container", "ml.contract.hyperparameters", "ml.contract.job_images"} <= set(SHARED)


def test_container_cli_never_imports_local_stack_and_ops_cli_starts_light():
    assert not any(m.startswith("local_stack") for m in imported_after("import ml.cli; ml.cli.build_parser()"))
    modules = imported_after("import sdxl_lora_ops.cli; sdxl_lora_ops.cli.build_parser()")
    assert not {m.split(".")[0] for m in modules} & set(HEAVY + ["airflow", "sagemaker", "moto"])
