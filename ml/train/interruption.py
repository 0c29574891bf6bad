"""SIGTERM (spot interruption, StopTrainingJob): finish the optimizer step, checkpoint, exit 143.

SageMaker gives a stopped job 120 s; the training loop checks the flag between optimizer steps.
"""

from __future__ import annotations

import logging
import signal
import time

import torch

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 143


class Interrupted(Exception):
    """SIGTERM arrived; a checkpoint has been written when training had started."""


class StopFlag:
    """Set by SIGTERM; the loop checks it between optimizer steps."""

    def __init__(self) -> None:
        self.raised = False
        self.at: float | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.raised:
            log.warning("SIGTERM received: checkpointing at the next optimizer step and exiting")
        self.raised, self.at = True, time.monotonic()

    def check(self) -> None:
        if self.raised:
            raise Interrupted()


def check_stop_everywhere(stop: StopFlag, accelerator) -> None:
    """Ranks agree on stopping, so all of them reach the checkpoint's collective calls together."""
    if accelerator.num_processes > 1:
        flag = torch.tensor([int(stop.raised)], device=accelerator.device)
        if int(accelerator.reduce(flag, reduction="sum")) > 0:
            stop.raised = True
    stop.check()
