"""What ``selfage train --resume`` does with the options given on its command line.

A resumed run keeps the method options it was started with (``config.METHOD_FIELDS``) and its base
model; engineering options (``--device``, ``--checkpoint-every``, ``--gradient-checkpointing``, …)
apply. An option given with ``--resume`` that the run cannot honour is refused (exit 2, one sentence
naming it) rather than ignored:

* a method option with another value than the run's (``--rank 8`` on a rank-16 run), ``--base-model``
  naming another model (other weights) than the run's, and ``--refs``/``--reg``/``--birth-date``/
  ``--ages-file`` (a resumed run takes no new photos);
* ``--steps N`` is honoured: it extends (or shortens) the run to N steps, also a finished run that
  kept its last checkpoint. This is sound because the learning rate is constant (no schedule to
  stretch) and the batch order and every draw are functions of (seed, step): a run extended from M
  to N steps ends with the weights of a run started with ``--steps N``. N must exceed the steps the
  checkpoint holds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.train.config import METHOD_FIELDS, TrainConfig

# Inputs of a fresh run that a resumed run cannot take (the names of run_train's arguments).
NEW_INPUTS = {"refs": "--refs", "reg": "--reg", "birth_date": "--birth-date", "ages_file": "--ages-file"}
# TrainConfig fields whose option name is not "--" + the field name with dashes.
_OPTION_NAMES = {"train_text_encoder": "--no-train-text-encoder"}


def option_name(field: str) -> str:
    """The command-line option of a TrainConfig field (``num_refs`` → ``--num-refs``)."""
    return _OPTION_NAMES.get(field) or NEW_INPUTS.get(field) or "--" + field.replace("_", "-")


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint folder (``step-NNNNNN``) holds."""
    return int(checkpoint.name.rsplit("-", 1)[-1])


def wants_extension(given: frozenset[str] | None, asked: TrainConfig, recorded: dict | None) -> bool:
    """Whether ``--steps`` asks a finished run for more steps than it was recorded with."""
    return bool(given and "steps" in given and recorded and int(asked.steps) > int(recorded.get("steps", 0)))


def check_finished(name: str, asked: TrainConfig, recorded: dict | None, given: frozenset[str] | None) -> None:
    """A finished run resumed with options: refuse those it would ignore (exit 2), as :func:`reconcile` does."""
    if not given or not recorded:
        return
    run_config = asked.with_method_of(recorded)
    if "steps" in given and asked.steps != run_config.steps:
        raise SelfageError(
            f"--steps {asked.steps}: run {name} is finished at {run_config.steps} steps; give more than "
            f"{run_config.steps} to extend it, or leave out --steps."
        )
    reconcile(name, run_config, asked, given - {"steps"}, None)


def reconcile(
    name: str, resumed: TrainConfig, asked: TrainConfig, given: frozenset[str] | None, checkpoint: Path | None
) -> TrainConfig:
    """The resumed run's config once the options given with ``--resume`` are applied or refused.

    ``resumed``: the config with the run's recorded method options (and base model); ``asked``: this
    call's options; ``given``: the names of the options given explicitly (``None``: not known, the
    recorded options win without a word, as for library callers); ``checkpoint``: the one resumed from."""
    if not given:
        return resumed
    inputs = sorted(given & set(NEW_INPUTS))
    if inputs:
        raise SelfageError(
            f"{option_name(inputs[0])} cannot be used with --resume: run {name} goes on with the images it started "
            f"with; leave out {option_name(inputs[0])}, or start a new run (another --run name) to add photos."
        )
    for field in METHOD_FIELDS:
        if field in ("steps", "base_model") or field not in given:
            continue
        mine, theirs = getattr(asked, field), getattr(resumed, field)
        if mine != theirs:
            shown = "" if isinstance(mine, bool) else f" {mine}"
            raise SelfageError(
                f"{option_name(field)}{shown} cannot be used with --resume: run {name} was started with "
                f"{field.replace('_', ' ')} {theirs!r} and keeps it; leave out {option_name(field)}, or start a new "
                "run (another --run name, or --force)."
            )
    if "base_model" in given:
        from selfage_cli.base_model import same_model

        if not same_model(asked.base_model, resumed.base_model):
            raise SelfageError(
                f"--base-model {asked.base_model} cannot be used with --resume: run {name} was trained on "
                f"{resumed.base_model} and keeps it; leave out --base-model, or start a new run (another --run "
                "name, or --force)."
            )
    if "steps" in given and asked.steps != resumed.steps and checkpoint is not None:
        done = checkpoint_step(checkpoint)
        if asked.steps <= done:
            raise SelfageError(
                f"--steps {asked.steps}: run {name}'s checkpoint already holds {done} steps; give more than "
                f"{done} to extend it, or leave out --steps."
            )
        how = "extends" if asked.steps > resumed.steps else "shortens"
        console.info(f"--steps {asked.steps} {how} run {name} from {resumed.steps} to {asked.steps} steps.")
        return replace(resumed, steps=asked.steps)
    return resumed
