"""Deterministic SageMaker job names: the same DAG run and trial always give the same name.

A retried task therefore finds the job its first try started instead of paying for a
second one. Names follow the original system's style
(`sdxl-lora-gridsearch-<run>-lr-0-0002-mts-1500-r-4`) and SageMaker's rule: at most 63
characters of [a-zA-Z0-9-], starting and ending with a letter or digit.
"""

from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 63
_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9]+")


def slug(text: str) -> str:
    """Letters and digits, every other run of characters one hyphen."""
    return _NOT_ALLOWED.sub("-", str(text)).strip("-")


def number(value: float | int) -> str:
    """0.0002 -> '0-0002', 1500 -> '1500', 1e-05 -> '1e-05' (as the original names wrote them)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return slug(text.replace("+", ""))


def run_token(run_id: str) -> str:
    """A short stable token for a DAG run id (they are long and full of characters SageMaker refuses)."""
    return hashlib.sha1(run_id.encode()).hexdigest()[:8]


def job_name(prefix: str, run_id: str, *parts: str, attempt: int = 1) -> str:
    """<prefix>-<run token>-<parts...>[-a<attempt>], shortened with a hash when over 63 characters."""
    pieces = [slug(prefix), run_token(run_id), *(slug(p) for p in parts if p)]
    if attempt > 1:
        pieces.append(f"a{attempt}")
    name = "-".join(p for p in pieces if p)
    if len(name) <= MAX_LENGTH:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_LENGTH - len(digest) - 1].rstrip('-')}-{digest}"


def trial_job_name(prefix: str, run_id: str, learning_rate: float, max_train_steps: int, rank: int,
                   attempt: int = 1) -> str:
    return job_name(prefix, run_id, f"lr-{number(learning_rate)}", f"mts-{max_train_steps}", f"r-{rank}",
                    attempt=attempt)


def is_valid(name: str) -> bool:
    return bool(re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name))
