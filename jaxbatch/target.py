"""Training to a target accuracy: when to evaluate, how long training took,
and what the run records when it gets there.

MLPerf measures a training run by its time to quality; Shallue et al. 2019
("Measuring the Effects of Data Parallelism on Neural Network Training")
by its steps to a result. With `--target-accuracy A` a run evaluates the
test split at its epoch ends and, with `--eval-every K`, every K steps of
each epoch too (chunk boundaries: train.chunk_plan), and stops at the first
evaluation that reaches A:

    steps_to_target     optimiser steps taken when that evaluation ran
    examples_to_target  the examples those steps saw (Poisson batches: the
                        ones drawn, not the padding)
    epochs_to_target    examples_to_target / N
    seconds_to_target   training time: the steps and the host's batch work,
                        without compiling (JAX's compile events are
                        subtracted), evaluations or checkpoints

A run that ends without reaching A records them as None.
"""

from __future__ import annotations

import time

from jax import monitoring

# What JAX reports while it turns a function into a program: tracing, lowering, XLA's compile.
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})


class TrainClock:
    """Seconds spent training, compilation excluded: the wall time between
    `start` and `stop`, less the durations of the compile events JAX reports
    in between. A context manager: it listens to JAX only while entered."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds  # the run's training time so far (from a checkpoint, on resume)
        self._since = None
        self._compiling = 0.0

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self._heard)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self._heard)

    def _heard(self, event: str, duration: float, **kwargs) -> None:
        if self._since is not None and event in COMPILE_EVENTS:
            self._compiling += duration

    def start(self) -> None:
        if self._since is None:
            self._since, self._compiling = time.perf_counter(), 0.0

    def stop(self) -> float:
        """Add the time since `start` (less compiling) and return the total."""
        if self._since is not None:
            self.seconds += max(0.0, time.perf_counter() - self._since - self._compiling)
            self._since = None
        return self.seconds


def eval_due(eval_every: int | None, epoch_step: int) -> bool:
    """Whether a chunk that ends at this step of its epoch ends at a multiple
    of `eval_every` (train.chunk_plan makes every multiple a chunk boundary)."""
    return bool(eval_every) and epoch_step % eval_every == 0


def reached(target: float | None, accuracy: float) -> bool:
    return target is not None and accuracy >= target


def record(target: float | None, point: dict | None, train_size: int) -> dict:
    """The run's record of its target: where the first evaluation that
    reached it ran (`point`, an evaluation record), or None's."""
    if target is None:
        return {}
    got = {"target_accuracy": target, "reached": point is not None}
    keys = ("steps_to_target", "examples_to_target", "epochs_to_target", "seconds_to_target")
    if point is None:
        return {**got, **dict.fromkeys(keys)}
    got.update(steps_to_target=point["step"], examples_to_target=point["examples"],
               epochs_to_target=point["examples"] / train_size, seconds_to_target=point["train_time_s"])
    if "epsilon" in point:
        got["epsilon_to_target"] = point["epsilon"]
    return got
