"""TensorBoard event files beside metrics.jsonl: `tensorboard --logdir runs`
shows every run folder as a run, the vmap and batched runs side by side.

Written with tensorboardX (a base dependency; it needs no TensorFlow) through
its synchronous `EventsWriter`, not `SummaryWriter`: the latter writes from a
background thread, where an error would go unseen, and it starts a
multiprocessing queue in every training process. One event per epoch, at
step = the epoch, holding the scalars the epoch record has (a DP-SGD run's
record holds only what its epsilon covers: privacy.released).

Events are a view of metrics.jsonl, never the record: if tensorboardX is not
installed nothing is written (`jaxbatch info` says so), and an error while
writing stops the events, with one `EventsWarning`, and never the run.
"""

from __future__ import annotations

import os
import struct
import time
import warnings
from pathlib import Path

PREFIX = "events.out.tfevents."

# record key -> tag; TensorBoard groups tags by the part before the slash.
TAGS = {
    "train_loss": "loss/train", "test_loss": "loss/test",
    "train_accuracy": "accuracy/train", "test_accuracy": "accuracy/test",
    "lr_end": "learning_rate", "epoch_time_s": "epoch_time_s",
    "epsilon": "privacy/epsilon", "epsilon_rdp": "privacy/epsilon_rdp",
    "noise_scale": "noise_scale/B_simple", "noise_scale_trace": "noise_scale/trace_S",
    "noise_scale_g2": "noise_scale/G2",
    "clipped_fraction": "clipping/clipped_fraction", "mean_grad_norm": "clipping/mean_grad_norm",
}
# Counts and constants, not curves.
SKIP = {"epoch", "steps", "examples_seen", "devices", "device_kind", "delta", "noise_scale_steps"}


class EventsWarning(UserWarning):
    """Writing TensorBoard events failed; the run went on without them."""


def writer_version() -> str | None:
    """tensorboardX's version, or None when it is not installed (no import of it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tensorboardX")
    except PackageNotFoundError:
        return None


def scalars(record: dict) -> dict[str, float]:
    """{tag: value} of an epoch record: its known keys under their tags, the
    figures kept under "nonprivate" with a `_nonprivate` suffix (not covered
    by epsilon, and marked so), any other number under its own name."""
    out = {}
    for key, value in record.items():
        if key == "nonprivate" and isinstance(value, dict):
            out.update({f"{tag}_nonprivate": v for tag, v in scalars(value).items()})
        elif key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[TAGS.get(key, key)] = float(value)
    return out


class EventLog:
    """Appends each epoch record to an event file in `folder` (created at the
    first record). After an error it writes nothing more and warns once."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.writer = None
        self.failed = writer_version() is None  # no tensorboardX: the run goes on without events
        self.error: str | None = None  # what stopped the events, for whoever asks

    def write(self, record: dict) -> None:
        if self.failed:
            return
        try:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars(record).items()]
            self._write(Event(wall_time=time.time(), step=int(record["epoch"]), summary=Summary(value=values)))
        except Exception as err:  # noqa: BLE001 - events are a view; the run must not end for them
            self._failed(err)

    def write_evaluation(self, record: dict) -> None:
        """An evaluation point (evals.jsonl) at step = the run's step: tags ending in _at_step, so
        TensorBoard keeps them apart from the per-epoch curves."""
        if self.failed:
            return
        try:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=f"{TAGS[key]}_at_step", simple_value=float(record[key]))
                      for key in ("test_loss", "test_accuracy")]
            self._write(Event(wall_time=time.time(), step=int(record["step"]), summary=Summary(value=values)))
        except Exception as err:  # noqa: BLE001 - events are a view; the run must not end for them
            self._failed(err)

    def _write(self, event) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        if self.writer is None:
            # EventsWriter names files by the second; pid and nanoseconds keep a
            # resumed run started within that second from truncating the last file.
            self.writer = EventsWriter(str(self.folder / "events"), f".{os.getpid()}.{time.time_ns()}")
        self.writer.write_event(event)
        self.writer.flush()  # on disk as it happens, like its metrics.jsonl or evals.jsonl line

    def _failed(self, err: Exception) -> None:
        self.failed, self.error = True, f"{type(err).__name__}: {err}"
        self.close()
        warnings.warn(f"TensorBoard events in {self.folder} stopped ({self.error}); metrics.jsonl still has "
                      "every epoch", EventsWarning, stacklevel=3)

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already reported, or nothing left to lose
                pass


def event_files(folder) -> list[Path]:
    return sorted(p for p in Path(folder).glob(PREFIX + "*") if p.is_file())


def remove_event_files(folder) -> None:
    """A replaced or resumed run's old events (resume rewrites the epochs it keeps)."""
    for path in event_files(folder):
        path.unlink(missing_ok=True)


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file in `folder`, in file
    order: the TFRecord framing (length, its CRC, data, its CRC; the CRCs
    are not checked here) parsed here, the events with tensorboardX's
    protobuf classes. A torn last record (a run killed mid-write) ends its
    file's reading."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(folder):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            start, end = at + 12, at + 12 + length
            if end + 4 > len(data):
                break
            event = Event.FromString(data[start:end])
            at = end + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
