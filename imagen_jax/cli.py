"""How `train.py` and `sample.py` end: a user's mistake prints one line, a bug keeps its traceback.

    _VERBOSE = flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
    ...
    if __name__ == "__main__":
        cli.run(main, verbose=_VERBOSE)

Exit status:
  0  success.
  1  a `UserError` while running (bad config value, unreadable data, missing checkpoint, divergence):
     `error: <message>` on stderr. Any other exception is a bug and ends with Python's traceback (also 1).
  2  the command line itself is wrong, found before `main` runs or by it: an unknown flag or config key,
     a value of the wrong type, a config file that does not load, `errors.UsageError`/`app.UsageError`.

`--verbose`, or `IMAGEN_JAX_VERBOSE=1` in the environment, re-raises instead, so the traceback shows.
This module never reads flag values itself: the scripts define `--verbose` and pass its holder in.

The `python -m imagen_jax...` programs parse with `ArgumentParser` (argparse) and end the same way
through `run_argparse`; `comma_separated` and `number` are argparse types that refuse a bad value before
anything loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import ml_collections
from absl import app, flags

from imagen_jax.errors import UsageError, UserError
from imagen_jax.parallel import distributed

VERBOSE_ENV = "IMAGEN_JAX_VERBOSE"
VERBOSE_HELP = f"Show the full traceback of errors (also: {VERBOSE_ENV}=1)."
EXIT_ERROR = 1
EXIT_USAGE = 2


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fail(message: str, status: int = EXIT_ERROR) -> NoReturn:
    """Prints `error: <message>` to stderr and exits with `status`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def run(main: Callable[[list[str]], Any], *, verbose: flags.FlagHolder[bool]) -> None:
    """`absl.app.run(main)`, reporting user errors as one line (see the module docstring)."""

    def parse(argv: list[str]) -> list[str]:
        # Before parsing, --verbose is only known from argv itself.
        loud = verbose_from_env() or any(a in (f"--{verbose.name}", f"-{verbose.name}") for a in argv)
        try:
            args = flags.FLAGS(argv)
            for flag in _config_flags():
                _check_loaded(flag)
        except Exception as e:  # noqa: BLE001 - re-raised below unless it is a command-line mistake
            message = None if loud else _command_line_error(e, argv)
            if message is None:
                raise
            fail(message, EXIT_USAGE)
        return args

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except (UserError, app.UsageError) as e:
            if verbose.value or verbose_from_env():
                raise
            _fail_with(e)

    app.run(guarded, flags_parser=parse)


def _fail_with(e: BaseException) -> NoReturn:
    usage = isinstance(e, (UsageError, app.UsageError))
    fail(str(e) or type(e).__name__, EXIT_USAGE if usage else EXIT_ERROR)


def run_argparse(main: Callable[[], Any]) -> None:
    """Runs an argparse program's `main()`, which reads `sys.argv`: a `UserError` ends as `error: <message>`
    (exit 1; 2 for a `UsageError`) unless `--verbose` is among the arguments or IMAGEN_JAX_VERBOSE=1.
    Command-line mistakes end in the program's `ArgumentParser` (exit 2)."""
    try:
        status = main()
    except UserError as e:
        if "--verbose" in sys.argv[1:] or verbose_from_env():
            raise
        _fail_with(e)
    sys.exit(status or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the `python -m imagen_jax...` programs: a command-line mistake ends as one
    `error: <message>` line with exit 2, as train.py's and sample.py's do."""

    def error(self, message: str) -> NoReturn:
        fail(message, EXIT_USAGE)


T = TypeVar("T")


def comma_separated(
    kind: Callable[[str], T],
    *,
    choices: Sequence[str] = (),
    minimum: float | None = None,
    maximum: float | None = None,
) -> Callable[[str], list[T]]:
    """An argparse `type` for `a,b,c`: each item converted by `kind` and, if given, one of `choices` and
    within [`minimum`, `maximum`]; argparse reports a bad item as `argument --x: <why>`."""

    def parse(text: str) -> list[T]:
        values = []
        for item in text.split(","):
            try:
                value = kind(item.strip())
            except ValueError:
                what = "an integer" if kind is int else "a number"  # str never raises ValueError
                raise argparse.ArgumentTypeError(f"{item!r} is not {what}") from None
            if choices and value not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(choices)}")
            if minimum is not None and value < minimum:
                raise argparse.ArgumentTypeError(f"{item!r} is below {minimum:g}")
            if maximum is not None and value > maximum:
                raise argparse.ArgumentTypeError(f"{item!r} is above {maximum:g}")
            values.append(value)
        return values

    return parse


def number(
    kind: Callable[[str], T], *, minimum: float | None = None, maximum: float | None = None
) -> Callable[[str], T]:
    """An argparse `type`: one int or float within [`minimum`, `maximum`]."""
    items = comma_separated(kind, minimum=minimum, maximum=maximum)

    def parse(text: str) -> T:
        if "," in text:
            raise argparse.ArgumentTypeError(f"{text!r} is one value, not a list")
        return items(text)[0]

    return parse


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    """The flags that join a multi-process run (`define_distributed_flags`)."""

    distributed: flags.FlagHolder[bool]
    coordinator_address: flags.FlagHolder[str | None]
    num_processes: flags.FlagHolder[int | None]
    process_id: flags.FlagHolder[int | None]

    def join(self) -> None:
        """Joins the multi-process run when asked to (--distributed, or any explicit value)."""
        explicit = dict(
            coordinator_address=self.coordinator_address.value,
            num_processes=self.num_processes.value,
            process_id=self.process_id.value,
        )
        if self.distributed.value or any(v is not None for v in explicit.values()):
            distributed.initialize(**explicit)


def define_distributed_flags() -> DistributedFlags:
    """--distributed and the explicit coordinator flags, for scripts that run on many hosts."""
    return DistributedFlags(
        distributed=flags.DEFINE_bool(
            "distributed",
            False,
            "Join a multi-process run (jax.distributed.initialize). On Cloud TPU VMs and under SLURM srun "
            "the coordinator, process count and id come from the environment.",
        ),
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0 (other clusters; implies --distributed)."
        ),
        num_processes=flags.DEFINE_integer(
            "num_processes", None, "Processes in the run (implies --distributed)."
        ),
        process_id=flags.DEFINE_integer("process_id", None, "This process's index (implies --distributed)."),
    )


def _config_flags() -> list[flags.Flag]:
    """The `DEFINE_config_file` flags of this program."""
    unique = {id(flags.FLAGS[name]): flags.FLAGS[name] for name in flags.FLAGS}  # short names repeat flags
    return [f for f in unique.values() if f.parser.flag_type() == "config object"]


def _check_loaded(flag: flags.Flag) -> None:
    """ml_collections keeps a config file that failed to load as an object that raises OSError on first use
    (inside `main`, as a traceback); touch it here so the failure is reported with the flag instead."""
    if flag.present:
        try:
            flag.value.keys()
        except OSError as e:
            raise _ConfigLoadError(flag.name, flag.config_filename, e) from e


class _ConfigLoadError(Exception):
    def __init__(self, name: str, path: str, error: BaseException):
        super().__init__(name, path, error)
        self.name, self.path, self.error = name, path, error


def _command_line_error(e: BaseException, argv: Sequence[str]) -> str | None:
    """One line for a command-line mistake, or None when `e` is not one (a bug: keep the traceback)."""
    if isinstance(e, _ConfigLoadError):
        return _load_failure(e.name, e.path, e.error)
    if isinstance(e, OSError):  # an override on a config file that did not load
        for flag in _config_flags():
            path = _flag_argument(argv, flag.name)
            if path is not None and "Failed loading config file" in str(e):
                return _load_failure(flag.name, path, e)
        return None
    if isinstance(e, flags.Error):
        return _flag_error(str(e))
    if isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
        return _override_error(argv)  # e.g. --config.train.num_step=5: ml_collections' lookup fails
    return None


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
    """The value given for --name (either `--name=V` or `--name V`), or None."""
    for i, arg in enumerate(argv):
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                return arg[len(prefix) + 1 :]
            if arg == prefix and i + 1 < len(argv):
                return argv[i + 1]
    return None


def _load_failure(name: str, path: str, error: BaseException) -> str:
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
        return f"--{name}={path}: config file {file!r} not found."
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"--{name}={path}: the config file does not load: {lines[-1] if lines else error!r}"


def _flag_error(message: str) -> str:
    """absl's messages, on one line; a config override of the wrong type names the key and its type."""
    match = re.match(r"flag --([\w.\-]+)=(.*?): (.*)", message, re.DOTALL)
    if match is None:
        return " ".join(message.split())
    name, value, reason = match.groups()
    if value == "None" and "must have a value other than None" in reason:  # a required flag is missing
        return f"--{name} is required."
    if "Error whilst parsing config file" in reason:  # the config's get_config() raised: its last line
        return f"--{name}={value}: the config file does not load: {reason.strip().splitlines()[-1].strip()}"
    flag = flags.FLAGS[name] if name in flags.FLAGS else None
    if flag is not None and "." in name and name.split(".", 1)[0] in {f.name for f in _config_flags()}:
        kind = flag.parser.flag_type()
        return f"--{name}={value}: {name} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({reason})."
    return " ".join(f"--{name}={value}: {reason}".split())


def _override_error(argv: Sequence[str]) -> str | None:
    """Names the first `--config.a.b` override whose key does not exist, with the closest keys."""
    for flag in _config_flags():
        path = _flag_argument(argv, flag.name)
        if path is None:
            continue
        try:
            config = flag.parser.parse(path)  # the file alone, without the overrides
            config.keys()
        except Exception:  # noqa: BLE001 - the original error is more useful than a second one
            return None
        for arg in argv:
            match = re.match(rf"-{{1,2}}(?:no)?{re.escape(flag.name)}\.([^=]+)", arg)
            if match:
                problem = _missing_key(config, match.group(1), flag.name)
                if problem:
                    return f"{arg.split('=', 1)[0]}: {problem}"
    return None


def _missing_key(config: ml_collections.ConfigDict, dotted: str, root: str) -> str | None:
    node: Any = config
    walked = root
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"{walked} is a value ({type(node).__name__}), not a section; it has no key {part!r}."
        if part not in node:
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"its keys: {', '.join(keys)}."
            return f"{walked} has no key {part!r}; {hint}"
        node, walked = node[part], f"{walked}.{part}"
    return None
