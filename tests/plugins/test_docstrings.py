"""Every public operator and task factory documents its parameters (`:param x:`, as the Amazon provider does)."""

import inspect

import pytest

from sdxl_lora import dag_common, deploy
from sdxl_lora.operators import endpoints, jobs, tuning

OPERATORS = [cls for module in (jobs, endpoints, tuning) for name, cls in vars(module).items()
             if inspect.isclass(cls) and name.endswith("Operator") and not name.startswith("_")
             and cls.__module__ == module.__name__]


def test_the_operator_modules_hold_the_operators_checked_here():
    assert {cls.__name__ for cls in OPERATORS} == {
        "ResumableSageMakerTrainingOperator", "ResumableSageMakerProcessingOperator", "ReusableSageMakerModelOperator",
        "ReusableSageMakerEndpointConfigOperator", "ResumableSageMakerEndpointOperator",
        "ResumableSageMakerTuningOperator"}


@pytest.mark.parametrize("operator", OPERATORS, ids=lambda cls: cls.__name__)
def test_every_public_operator_documents_its_parameters(operator):
    doc = inspect.getdoc(operator) or ""
    assert ":param config:" in doc and ":param aws_conn_id:" in doc


@pytest.mark.parametrize("factory", [deploy.deploy_group, deploy.plan, deploy.change_traffic, deploy.register_model, dag_common.watch,
                                     dag_common.deploy_requested, dag_common.no_retry],
                         ids=lambda f: getattr(f, "__name__", None) or f.function.__name__)
def test_every_public_task_factory_documents_its_parameters(factory):
    function = getattr(factory, "function", factory)
    parameters = [name for name in inspect.signature(function).parameters if name not in ("self",)]
    doc = inspect.getdoc(function) or ""
    for name in parameters:
        assert f":param {name}:" in doc, f"{function.__name__} does not document {name}"
