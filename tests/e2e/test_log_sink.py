"""Job output reaches CloudWatch Logs line by line; blank lines, which CloudWatch refuses, are left out."""

import boto3
from moto import mock_aws

from local_stack.runner import LogSink


@mock_aws
def test_blank_lines_are_left_out_and_the_rest_arrive_in_order():
    logs = boto3.client("logs", region_name="us-east-1")
    sink = LogSink(logs, "/aws/sagemaker/TrainingJobs", "job/algo-1-0")
    for line in ("step=1 loss=0.5", "", "step=2 loss=0.4"):
        sink.add(line)
    sink.flush()
    events = logs.get_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName="job/algo-1-0")["events"]
    assert [e["message"] for e in events] == ["step=1 loss=0.5", "step=2 loss=0.4"]


@mock_aws
def test_a_second_sink_on_the_same_stream_appends_to_it():
    """A spot job restarted within the second it was interrupted names the same stream (`<job>/algo-1-<epoch>`):
    its lines follow the first start's, where creating the stream again once failed the job."""
    logs = boto3.client("logs", region_name="us-east-1")
    for line in ("step=3 loss=0.5", "step=4 loss=0.4"):
        sink = LogSink(logs, "/aws/sagemaker/TrainingJobs", "job/algo-1-0")
        sink.add(line)
        sink.flush()
    events = logs.get_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName="job/algo-1-0")["events"]
    assert [e["message"] for e in events] == ["step=3 loss=0.5", "step=4 loss=0.4"]
