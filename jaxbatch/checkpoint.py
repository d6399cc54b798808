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

from pathlib import Path

from flax import serialization

from jaxbatch.atomic import write_atomic
from jaxbatch.errors import JaxbatchError

FORMAT = 1
# Settings that do not change a run's numbers, so a resume may change them.
FREE_SETTINGS = {"out", "overwrite", "data_dir", "source", "resume", "checkpoint_every", "keep", "steps_per_chunk",
                 "unroll", "eval_batch_size", "devices", "record_steps", "dp_epsilon"}


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
    return sorted(where.glob("ckpt-*.msgpack")) if where.is_dir() else []


def save(out, position: dict, epoch_sums: dict, config, state, keep: int) -> Path:
    """Write one checkpoint of `state` (a host copy) and drop all but the newest `keep`."""
    where = folder(out)
    where.mkdir(parents=True, exist_ok=True)
    payload = serialization.msgpack_serialize({
        "format": FORMAT, "position": position, "epoch_sums": epoch_sums,
        "settings": settings(config), "state": serialization.to_state_dict(state)})
    path = write_atomic(where / f"ckpt-{position['step']:09d}.msgpack", lambda tmp: tmp.write_bytes(payload))
    for old in paths(out)[:-keep]:
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


def latest(out, config) -> dict:
    """The newest readable checkpoint in `out` whose settings match `config`'s."""
    found = paths(out)
    if not found:
        raise JaxbatchError(f"no checkpoint in {folder(out)} to resume from; run without --resume to start "
                            "a new run there")
    errors = []
    for path in reversed(found):
        try:
            ckpt = serialization.msgpack_restore(path.read_bytes())
            if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
                raise ValueError("not a jaxbatch checkpoint")
        except Exception as err:  # a damaged file: fall back to the one before
            errors.append(f"{path.name}: {err}")
            continue
        check_settings(ckpt["settings"], settings(config), path)
        ckpt["path"] = path
        return ckpt
    raise JaxbatchError(f"no readable checkpoint in {folder(out)} ({'; '.join(errors)}); "
                        "run without --resume to start again")


def check_settings(saved: dict, wanted: dict, path: Path) -> None:
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            raise JaxbatchError(
                f"cannot resume: {path.name} was made with {key} {saved.get(key)!r} and this run has "
                f"{wanted.get(key)!r}; resume with the checkpoint's {{setting}}, or start a new run in "
                "another --out", setting=key)


def restore(ckpt: dict, target):
    """The checkpoint's state in the structure of `target` (a fresh (params,
    optimiser state) of the same run), with the saved arrays' values and dtypes."""
    return serialization.from_state_dict(target, ckpt["state"])
