"""What a run leaves behind and what it tells as it goes.

    RunFiles   the output folder: config.json, metrics.jsonl (a line per
               epoch, appended as it ends), TensorBoard event files (the
               same epochs: jaxbatch/events.py), params.msgpack,
               checkpoints/, in a folder that jaxbatch/rundir.py checked
               and locked
    Progress   each chunk of steps' summary, read on the host one chunk late
               (the one place training waits for the device), summed into
               the epoch's metrics; raises Diverged at the exact bad step
    environment  what the run ran on, for config.json

With several processes only process 0 writes or tells.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import serialization
from jax.sharding import Mesh

from jaxbatch import checkpoint, events
from jaxbatch.atomic import make_folder, remove_made, write_atomic
from jaxbatch.devices import fetch
from jaxbatch.errors import JaxbatchError
from jaxbatch.precision import matmul_precision
from jaxbatch.rundir import FolderLock, check_out


EVALS = "evals.jsonl"  # one line per evaluation point: target.py


class Diverged(JaxbatchError):
    """The training loss became NaN, infinite, or larger than config.max_loss."""

    def __init__(self, epoch: int, step: int, loss: float, last_finite_loss: float | None, config):
        self.epoch, self.step, self.loss, self.last_finite_loss = epoch, step, loss, last_finite_loss
        self.steps: list = []  # with config.record_steps: the steps recorded up to here
        last = "none" if last_finite_loss is None else f"{last_finite_loss:.4g}"
        super().__init__(
            f"training diverged at epoch {epoch}, step {step}: the loss reached {loss:.4g} "
            f"(NaN, inf, or above --max-loss {config.max_loss:g}; last good loss {last}). "
            f"With inputs x/255*{config.input_scale:g} and lr {config.lr:g} the updates overshoot: "
            "lower --lr, scale inputs to [0, 1] (--input-scale 1) or --standardize them, "
            "or add --schedule warmup"
        )


class RunFiles:
    """metrics.jsonl (one line per epoch, appended as it ends), config.json,
    params.msgpack and checkpoints/, in a folder locked for the run (a
    context manager: the lock goes at its end). With several processes only
    process 0 writes. A new run refuses a folder holding another run's files
    (`check_out`); with config.overwrite it removes them first."""

    def __init__(self, out: str | None, config, environment: dict, check=None):
        self.out = Path(out) if out else None
        self.dir = self.out if jax.process_index() == 0 else None
        self.config = config
        # Which checkpoints pass the run's checks (checkpoint.passes with
        # `check`), by file name: rotation counts only those. Each file is read
        # once; the run's own are good as written.
        self.check, self.good = check, {}
        self.lock = None
        self.events = None
        if self.dir is None:
            return
        check_out(out, config.resume, config.overwrite)
        try:
            made = make_folder(self.dir)
        except OSError as err:
            raise JaxbatchError(f"cannot create {out}: {err.strerror}; pass {{setting}} a folder you can write "
                                "to", setting="out") from None
        try:
            self.lock = FolderLock(self.dir)
            check_out(out, config.resume, config.overwrite)  # again, now that no other run can start here
            self.metrics = self.dir / "metrics.jsonl"
            checkpoint.remove_partial(self.dir)
            if not config.resume:
                # --overwrite: this run's config.json must not sit beside another
                # run's metrics, parameters and checkpoints as if they were its own.
                self.metrics.unlink(missing_ok=True)
                (self.dir / EVALS).unlink(missing_ok=True)
                (self.dir / "params.msgpack").unlink(missing_ok=True)
                checkpoint.clear(self.dir)
                events.remove_event_files(self.dir)
            self.events = events.EventLog(self.dir)
            record = {**dataclasses.asdict(config), "environment": environment}
            self._write_atomic("config.json", json.dumps(record, indent=2).encode())
        except BaseException:  # a refused or failed start removes what it created, and nothing else
            self.close(failed_start=True)
            remove_made(made)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self, failed_start: bool = False) -> None:
        if self.events is not None:
            self.events.close()
        if self.lock is not None:
            self.lock.release(remove=failed_start)
            self.lock = None

    def _write_atomic(self, name: str, payload: bytes) -> None:
        write_atomic(self.dir / name, lambda tmp: tmp.write_bytes(payload))

    def history(self, epochs_done: int) -> list:
        """On resume: the metrics of the epochs the checkpoint has done. Lines
        of later epochs (written after the checkpoint, before the run was
        killed) are dropped, so the resumed run writes each epoch once."""
        if self.out is None or not (self.out / "metrics.jsonl").exists():
            return []
        lines = (self.out / "metrics.jsonl").read_text(errors="replace").splitlines()
        records = [_epoch_record(line) for line in lines if line.strip()]
        # A torn or damaged line is dropped like a line past the checkpoint:
        # the checkpoint, not the log, says where the run is.
        kept = [r for r in records if r is not None and r["epoch"] <= epochs_done]
        if self.dir is not None and len(kept) != len(records):
            self._write_atomic("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
        if self.dir is not None:  # the events again from the kept epochs: none past the checkpoint
            events.remove_event_files(self.dir)
            for record in kept:
                self.events.write(record)
        return kept

    def evaluations(self, up_to_step: int) -> list:
        """On resume: the evaluations (evals.jsonl) up to the checkpoint's
        step; later ones are dropped, as `history` drops later epochs."""
        path = self.out / EVALS if self.out is not None else None
        if path is None or not path.exists():
            return []
        records = [_json_line(line) for line in path.read_text(errors="replace").splitlines() if line.strip()]
        kept = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)
                and r["step"] <= up_to_step]
        if self.dir is not None:
            if len(kept) != len(records):
                self._write_atomic(EVALS, "".join(json.dumps(r) + "\n" for r in kept).encode())
            for record in kept:
                self.events.write_evaluation(record)
        return kept

    def evaluation(self, record: dict) -> None:
        """One evaluation point (--eval-every, --target-accuracy), appended to evals.jsonl."""
        if self.dir is not None:
            with open(self.dir / EVALS, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.events.write_evaluation(record)

    def epoch(self, record: dict) -> None:
        if self.dir is not None:
            try:
                with open(self.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:  # a failed write() (a full disk) names no file: name it
                raise OSError(err.errno, err.strerror, str(self.metrics)) from err
            self.events.write(record)  # after the record itself: an events error never costs a line

    def checkpoint(self, position: dict, epoch_sums: dict, state) -> Path | None:
        host_state = fetch(state)  # every process waits here; process 0 writes
        if self.dir is None:
            return None
        path = checkpoint.save(self.dir, position, epoch_sums, self.config, host_state, self.config.keep,
                               self._good)
        self.good[path.name] = True
        return path

    def _good(self, path: Path) -> bool:
        if path.name not in self.good:
            self.good[path.name] = checkpoint.passes(path, self.config, self.check)
        return self.good[path.name]

    def params(self, params) -> None:
        if self.dir is not None:
            self._write_atomic("params.msgpack", serialization.to_bytes(params))


def _json_line(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _epoch_record(line: str) -> dict | None:
    """One metrics.jsonl line as a record, or None if it is not one."""
    record = _json_line(line)
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return record if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def environment(mesh: Mesh) -> dict:
    """What the run ran on: JAX, the devices and processes, and the float32
    matrix-product precision in force (TF32 on NVIDIA GPUs and bfloat16 passes
    on TPUs by default; see jaxbatch/precision.py)."""
    device = mesh.devices.flat[0]
    return {"jax": jax.__version__, "devices": mesh.size, "device_kind": device.device_kind,
            "processes": jax.process_count(), **matmul_precision()}


class Progress:
    """Reads each chunk's summary on the host one chunk late, so the device is
    never idle while Python looks: `push` a chunk just launched and get the
    previous one read. Raises Diverged at the exact step that went bad."""

    def __init__(self, config, notify):
        self.config, self.notify = config, notify
        self.pending = None
        self.last_finite = None
        self.steps: list = []  # with config.record_steps

    def start_epoch(self, epoch: int, steps: int, sums: dict | None = None):
        """Start an epoch's sums at 0, or where a checkpoint left them."""
        self.epoch, self.epoch_steps = epoch, steps
        sums = sums or {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "last_finite": self.last_finite}
        self.loss_sum, self.correct, self.seen = sums["loss_sum"], sums["correct"], sums["seen"]
        self.last_finite = sums["last_finite"]
        self.extra = dict(sums.get("extra", {}))  # the gradient function's own sums (gradients.py, noise_scale.py)
        self.notify({"kind": "epoch_start", "epoch": epoch, "steps": steps})

    def sums(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "last_finite": self.last_finite, "extra": dict(self.extra)}

    def push(self, start: int, stop: int, summary, trace):
        self.flush()
        self.pending = (start, stop, summary, trace)

    def flush(self):
        """Wait for the chunk launched last and account for it."""
        if self.pending is None:
            return
        start, stop, summary, trace = self.pending
        self.pending = None
        s = fetch(summary)  # the one place the host waits for the device
        if trace is not None:
            self._record(fetch(trace))
        first = int(s["first_bad"])
        if first >= 0:
            last_good = float(s["before_bad"]) if first > 0 else self.last_finite
            err = Diverged(self.epoch, start + first + 1, float(s["bad_loss"]), last_good, self.config)
            err.steps = self.steps
            raise err
        self.last_finite = float(s["last_loss"])
        self.loss_sum += float(s["loss_sum"])
        self.correct += float(s["correct"])
        self.seen += float(s["count"])
        for k, v in s["extra"].items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)
        self.notify({"kind": "chunk", "epoch": self.epoch, "step": stop, "steps": self.epoch_steps,
                     "loss": self.last_finite})

    def _record(self, trace):
        for i, loss in enumerate(trace["loss"]):
            if len(self.steps) < self.config.record_steps:
                finite = bool(np.isfinite(loss))
                self.steps.append({
                    "loss": float(loss) if finite else None,
                    "zero_output_fraction": float(trace["zero_output_fraction"][i]) if finite else None,
                    "grad_norm": {k: float(v[i]) if finite else None for k, v in trace["grad_norm"].items()}})
