"""`sdxl-lora-ops local-stack`: serve the stand-in until Ctrl-C or SIGTERM, then stop every child."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from pathlib import Path

from local_stack import runner
from local_stack.aws import client_environment
from local_stack.gateway import LocalStack
from local_stack.jobs import Options


def run(port: int, workdir: str, max_concurrent_jobs: int, spot_interruption_at: str | None,
        host: str = "127.0.0.1", persist: bool = False, instance_quotas: dict[str, int] | None = None,
        threads_per_job: int | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request drowns everything else
    options = Options(max_concurrent_jobs=max_concurrent_jobs, spot_interruption_pattern=spot_interruption_at,
                      instance_quotas=instance_quotas or {})
    stack = LocalStack(Path(workdir), port=port, host=host, options=options, persist=persist)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    threads = threads_per_job or os.environ.get("OMP_NUM_THREADS") or 1
    if int(threads) < 1:
        raise SystemExit(f"--threads-per-job must be at least 1, got {threads}")
    # Every container (and the warm starter they fork from) inherits it: torch reads it at import time.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    stack.start()
    runner.prestart()  # the warm starter imports the torch stack while the stack waits for its first job
    print(f"local stack serving S3, CloudWatch Logs, IAM, STS and SageMaker on {stack.endpoint_url}")
    print(f"work dir: {stack.workdir}; {threads} torch thread(s) per job (--threads-per-job)")
    if stack.snapshot is not None:
        print(f"S3 kept in {stack.snapshot} across restarts: {stack.restored} objects restored")
    print("client environment:")
    for key, value in client_environment(stack.endpoint_url).items():
        print(f"  export {key}={value}")
    print("ready", flush=True)
    stop.wait()
    print("stopping: ending jobs and endpoints" + (", saving S3" if stack.snapshot else ""), flush=True)
    stack.stop()
    return 0
