"""One rule for "no such resource" (plugins/sdxl_lora/missing.py), used by every Describe* lookup."""

import pytest
from botocore.exceptions import ClientError

from sdxl_lora.missing import describe_or_none, ignore_missing, is_missing


def _error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "Could not find it"}}, "Describe")


@pytest.mark.parametrize("code", ["ValidationException", "ResourceNotFound"])
def test_both_codes_aws_uses_for_a_missing_resource_mean_absent(code):
    assert is_missing(_error(code))

    def describe(**name):
        raise _error(code)

    assert describe_or_none(describe, EndpointName="ep") is None
    ignore_missing(describe, ModelName="m")  # a resource already gone is what a deletion wants


def test_other_errors_are_not_absence_and_are_raised():
    assert not is_missing(_error("ThrottlingException"))
    assert not is_missing(ValueError("ValidationException"))

    def describe(**name):
        raise _error("AccessDeniedException")

    with pytest.raises(ClientError):
        describe_or_none(describe, EndpointName="ep")
    with pytest.raises(ClientError):
        ignore_missing(describe, ModelName="m")


def test_an_existing_resource_is_described_with_its_name():
    described = describe_or_none(lambda **name: {"described": name}, EndpointName="ep")
    assert described == {"described": {"EndpointName": "ep"}}
