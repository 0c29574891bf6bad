"""A docker-free stand-in for the AWS services this project uses, on one loopback endpoint.

moto serves S3, CloudWatch Logs, IAM and STS; this package adds a SageMaker control plane
and runtime that run the ml/ entrypoints as local processes under the container contract.
"""
