"""The one rule for "there is no such resource" in SageMaker's answers.

A Describe* (or Delete*) call names a resource that does not exist: AWS answers ValidationException ("Could not
find ...", "Requested resource not found"), and some calls (DescribeHyperParameterTuningJob among them) answer
ResourceNotFound. Both mean absent, everywhere: the attempt lookups of the job operators, the endpoint operators,
the deployment plan and the rollback's deletions.
"""

from __future__ import annotations

from collections.abc import Callable

from botocore.exceptions import ClientError

MISSING_CODES = ("ValidationException", "ResourceNotFound")


def is_missing(error: BaseException) -> bool:
    """Whether a boto3 error says the resource it named does not exist.

    :param error: any exception; only a botocore ClientError with one of MISSING_CODES is "missing".
    """
    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in MISSING_CODES


def describe_or_none(describe: Callable[..., dict], **name) -> dict | None:
    """A Describe* call's answer, or None when there is no resource of that name; other errors are raised.

    :param describe: the boto3 client's method, e.g. ``client.describe_endpoint``.
    :param name: its keyword arguments, e.g. ``EndpointName="ep"``.
    """
    try:
        return describe(**name)
    except ClientError as error:
        if is_missing(error):
            return None
        raise


def ignore_missing(call: Callable[..., object], **name) -> None:
    """Run a call (a Delete*, say) for which a resource already gone is success; other errors are raised.

    :param call: the boto3 client's method, e.g. ``client.delete_model``.
    :param name: its keyword arguments, e.g. ``ModelName="m"``.
    """
    describe_or_none(call, **name)
