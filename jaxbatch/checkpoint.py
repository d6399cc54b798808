"""Checkpoints: everything a run needs to go on exactly where it stopped.

A checkpoint is one msgpack file, `<out>/checkpoints/ckpt-<step>.msgpack`:

    {"format": 1,
     "position": {"step", "epoch", "epoch_step", "epochs_done"},   where the run is
     "epoch_sums": {"loss_sum", "correct", "seen", "last_finite"},  the running epoch's metrics so far
     "settings": {...},                                            what the run's numbers depend on
     "state": (params, optimiser state) as a state dict}

Nothing else is needed to continue bit for bit: an epoch's batches come from
(seed, epoch) alone (train.epoch_key), so the position says which batches
come next. Parameters and optimiser state are replicated over the devices
(train.data_mesh), so one host copy is the whole state, and a run on any
number of devices writes and reads the same file.

Saves are atomic: the file is written under a temporary name and renamed
(`atomic.write_atomic`), so a crash mid-save leaves the previous checkpoints
as they were, and a reader never sees half a file. The newest `keep` are
kept. Plain msgpack (flax.serialization) rather than Orbax: the state is a
few small replicated arrays, and Orbax would bring tensorstore and its
dependencies to every install for no gain here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from flax import serialization, traverse_util

from jaxbatch.atomic import write_atomic
from jaxbatch.errors import JaxbatchError
from jaxbatch.rundir import run_files_in

FORMAT = 1
# Settings that do not change a run's numbers, so a resume may change them.
FREE_SETTINGS = {"out", "overwrite", "data_dir", "source", "resume", "checkpoint_every", "keep", "steps_per_chunk",
                 "unroll", "eval_batch_size", "devices", "record_steps", "dp_epsilon", "dp_nonprivate_metrics"}


def folder(out) -> Path:
    return Path(out) / "checkpoints"


def settings(config) -> dict:
    """The config fields a run's numbers depend on."""
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(config).items() if k not in FREE_SETTINGS}


def paths(out) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (temporary files of an
    interrupted save are not among them)."""
    where = folder(out)
    # Regular files only: a FIFO or device named like a checkpoint would block the read forever.
    return sorted(p for p in where.glob("ckpt-*.msgpack") if p.is_file()) if where.is_dir() else []


def save(out, position: dict, epoch_sums: dict, config, state, keep: int, good: Callable[[Path], bool]) -> Path:
    """Write one checkpoint of `state` (a host copy) and drop all but the
    newest `keep` good ones. `good(path)` says whether another checkpoint
    passes the resume's checks (`passes`); one that does not is never
    counted as kept, and is left where it is: it is the user's to look at,
    and every resume names it as skipped."""
    where = folder(out)
    where.mkdir(parents=True, exist_ok=True)
    payload = serialization.msgpack_serialize({
        "format": FORMAT, "position": position, "epoch_sums": epoch_sums,
        "settings": settings(config), "state": serialization.to_state_dict(state)})
    path = write_atomic(where / f"ckpt-{position['step']:09d}.msgpack", lambda tmp: tmp.write_bytes(payload))
    kept = 0
    for old in reversed(paths(out)):
        if old == path or good(old):
            kept += 1
            if kept > keep:
                old.unlink(missing_ok=True)
    return path


def clear(out) -> None:
    """A new run in `out` starts without the previous run's checkpoints."""
    for path in paths(out):
        path.unlink()


def remove_partial(out) -> None:
    """Drop what a write killed midway left in the run folder and its
    checkpoints: temporary files (atomic.write_atomic names them
    `.<name>.<pid>.tmp`). Called by the run holding the folder's lock, so no
    other run is writing them. Readers never look at them anyway."""
    for where in (Path(out), folder(out)):
        for path in where.glob(".*.tmp") if where.is_dir() else ():
            path.unlink(missing_ok=True)


def latest(out, config, check: Callable[[dict], None] | None = None) -> dict:
    """The newest checkpoint in `out` that reads whole, has every field of
    the format, was made with `config`'s settings, and passes `check` (the
    run's own tests of its position and state, raising ValueError). One that
    fails is skipped for the one before, and the returned checkpoint lists
    it under "skipped" as (file name, why). A checkpoint made with other
    settings is refused outright: that is the user's choice to make."""
    found = paths(out)
    if not found and run_files_in(out):  # a run stopped before its first checkpoint: a new run needs --overwrite
        raise JaxbatchError(f"the run in {out} saved no checkpoint ({', '.join(run_files_in(out))}, nothing in "
                            f"{folder(out)}), so there is nothing to resume; start it again with --overwrite "
                            "in place of --resume")
    if not found:
        raise JaxbatchError(f"no checkpoint in {folder(out)} to resume from; run without --resume to start "
                            "a new run there")
    skipped = []
    for path in reversed(found):
        try:
            ckpt = checked(path, config, check)
        except ValueError as err:
            skipped.append((path.name, str(err)))
            continue
        ckpt["path"], ckpt["skipped"] = path, skipped
        return ckpt
    raise JaxbatchError(f"no usable checkpoint in {folder(out)} ({'; '.join(f'{n}: {why}' for n, why in skipped)}); "
                        "start again with --overwrite, or in another --out")


def checked(path: Path, config, check: Callable[[dict], None] | None = None) -> dict:
    """The checkpoint at `path`, read and checked as `latest` checks it:
    ValueError for damage, JaxbatchError for another run's settings."""
    ckpt = read(path)
    check_settings(ckpt["settings"], settings(config), path)
    if check is not None:
        check(ckpt)
    return ckpt


def passes(path: Path, config, check: Callable[[dict], None] | None = None) -> bool:
    """Whether this run could resume from the checkpoint at `path`."""
    try:
        checked(path, config, check)
    except (ValueError, JaxbatchError):
        return False
    return True


def read(path: Path) -> dict:
    """A checkpoint file's contents, with every field of the format and of
    the right kind; ValueError saying what is wrong otherwise."""
    try:
        ckpt = serialization.msgpack_restore(path.read_bytes())
    except OSError as err:
        raise ValueError(f"cannot read it ({err.strerror or err})") from None
    except Exception as err:  # msgpack's errors for a torn or foreign file are of several kinds
        raise ValueError(f"not a whole msgpack file ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError("not a jaxbatch checkpoint of this format")
    for field in ("position", "epoch_sums", "settings", "state"):
        if not isinstance(ckpt.get(field), dict):
            raise ValueError(f"its {field!r} is missing or not a mapping")
    position = ckpt["position"]
    for key in ("step", "epoch", "epoch_step", "epochs_done"):
        value = position.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"its position's {key!r} is {value!r}, not a whole number of 0 or more")
    sums = ckpt["epoch_sums"]
    for key in ("loss_sum", "correct", "seen"):
        if not _is_number(sums.get(key)):
            raise ValueError(f"its epoch sums' {key!r} is {sums.get(key)!r}, not a finite number")
    if sums.get("last_finite") is not None and not _is_number(sums["last_finite"]):
        raise ValueError("its epoch sums' 'last_finite' is not a finite number")
    extra = sums.get("extra", {})
    if not isinstance(extra, dict) or not all(_is_number(v) for v in extra.values()):
        raise ValueError("its epoch sums' 'extra' is not a mapping of finite numbers")
    return ckpt


def _is_number(value) -> bool:
    """A finite int or float: sums that went NaN or inf are damage, as in the state."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_position(position: dict, steps_per_epoch: int, total_steps: int, epochs: int) -> None:
    """ValueError unless `position` is a point this run can reach: a step
    within the run, its epoch and step within the epoch consistent with it."""
    step, epoch, epoch_step = position["step"], position["epoch"], position["epoch_step"]
    if epoch_step:  # within an epoch (at its last step: stopped before its evaluation)
        reachable = step == (epoch - 1) * steps_per_epoch + epoch_step and epoch_step <= steps_per_epoch
    else:  # an epoch's end (the last one may stop early, at --max-steps)
        reachable = step == 0 if epoch == 1 else (epoch - 2) * steps_per_epoch < step <= (epoch - 1) * steps_per_epoch
    if not (reachable and 1 <= epoch <= epochs + 1 and position["epochs_done"] == epoch - 1 and step <= total_steps):
        raise ValueError(f"its position (step {step}, epoch {epoch}, step {epoch_step} of the epoch) is not a "
                         f"point of this run ({total_steps} steps, {steps_per_epoch} per epoch)")


# What a checkpoint of another run differs in first: a mismatch names these
# before the rest (a checkpoint of another model differs in many settings).
FIRST_NAMED = ("model", "dataset")


def check_settings(saved: dict, wanted: dict, path: Path) -> None:
    keys = dict.fromkeys([*FIRST_NAMED, *sorted(set(saved) | set(wanted))])
    differ = [key for key in keys if saved.get(key) != wanted.get(key)]
    if differ:
        key, others = differ[0], differ[1:]
        also = f" ({', '.join(others)} {'differs' if len(others) == 1 else 'differ'} too)" if others else ""
        raise JaxbatchError(
            f"cannot resume: {path.name} was made with {key} {saved.get(key)!r} and this run has "
            f"{wanted.get(key)!r}{also}; resume with the checkpoint's {{setting}}, or start a new run in "
            "another --out", setting=key)


def restore(ckpt: dict, target):
    """The checkpoint's state in the structure of `target` (a fresh (params,
    optimiser state) of the same run), with the saved arrays' values.
    ValueError unless the saved tree has exactly `target`'s entries, each of
    the same shape and dtype (another model's state, a missing or extra
    entry, a reshaped or retyped array)."""
    saved = traverse_util.flatten_dict(ckpt["state"], sep="/")
    wanted = traverse_util.flatten_dict(serialization.to_state_dict(target), sep="/")
    if saved.keys() != wanted.keys():
        missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        raise ValueError(f"its state is not this run's: {len(missing)} entries missing ({', '.join(missing[:2])}"
                         f"{', ...' if len(missing) > 2 else ''}), {len(extra)} unknown "
                         f"({', '.join(extra[:2])}{', ...' if len(extra) > 2 else ''})")
    for key, want in wanted.items():
        got = saved[key]
        if not isinstance(got, (np.ndarray, np.generic, int, float)) or np.shape(got) != np.shape(want) \
                or np.asarray(got).dtype != np.asarray(want).dtype:
            raise ValueError(f"its state entry {key} is {_describe(got)}, this run's is {_describe(want)}")
        # A run saves no checkpoint past a divergence (train: the chunk is
        # checked first), so a NaN or inf here is damage, not the run's state.
        if not np.all(np.isfinite(got)):
            raise ValueError(f"its state entry {key} holds NaN or inf")
    return serialization.from_state_dict(target, ckpt["state"])


def _describe(value) -> str:
    if isinstance(value, (np.ndarray, np.generic, int, float)) or hasattr(value, "dtype"):
        return f"{np.asarray(value).dtype}{list(np.shape(value))}"
    return type(value).__name__
