"""What every command line shares: one-line errors with exit status 2, --debug, quiet logs, -v.

Every entry point's ``main`` runs under :func:`run_cli` (through :func:`command`) with its parser
built by :class:`ArgumentParser`:

- Bad input (an argument, a config field, a missing, unreadable or corrupt file) ends the command
  with ONE line on stderr, ``error: <file or argument>: <reason>``, and exit status 2. The
  project raises bad input as ``ValueError`` subclasses whose message starts with the file or
  field (``VolumeError``, ``ConfigError``, ``ManifestError``, ...); ``OSError`` is a file that
  cannot be opened or written. ``--debug`` prints the traceback as well. Any other exception is
  a bug and keeps its traceback.
- Quiet by default: the console shows the project's own messages, progress bars and results;
  third-party libraries (vLLM, Ray, DeepSpeed, transformers, MLflow, torch's C++ logs, Python
  warnings) are turned down to errors, on the console and in the processes a command starts.
  ``-v`` (or ``MEDVOL_VERBOSE=1``, which a parent command passes to its stages) leaves them as
  they are. Every log record of the project goes to a file as well when a command names one
  (:func:`log_to_file`, or ``MEDVOL_LOG_FILE`` set by a parent command).
- No partial output: commands write files under a temporary name and rename them, and remove
  what they created when they fail (:func:`removed_on_failure`).

- One vocabulary: a flag means the same thing, with the same default, in every command
  (``docs/cli.md``). A command that takes a run config gets ``--config FILE``, ``--print-config``
  and trailing ``key=value`` overrides from :func:`add_config_arguments` and reads them with
  :func:`command_config`; ``--device`` comes from :func:`add_device_argument`.

For any new entry point: build its parser with :class:`ArgumentParser`, raise
:class:`UsageError` (or a ``ValueError`` naming the file or field) for bad input, decorate its
``main(argv=None)`` with :func:`command` (so ``python -m`` and its console script behave alike),
and end the module with ``sys.exit(main())``.

This module sits in ``common`` (the lowest floor) so every package can import it; its top imports
the standard library only (``cluster.default_run`` checks the interpreter before any other import).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

VERBOSE_ENV = "MEDVOL_VERBOSE"  # "1": a parent command ran with -v
LOG_FILE_ENV = "MEDVOL_LOG_FILE"  # a parent command's choice of this command's log file
PROJECT_LOGGERS = ("data", "rollout", "reward_server", "learner", "cluster", "evaluation", "bench")

# Third-party switches of quiet mode; set only where the user has not set them. They are
# environment variables so that the processes a command starts (SFT, the GRPO job, Ray workers,
# vLLM's engine) are quiet too.
QUIET_ENVIRONMENT = {
    "VLLM_LOGGING_LEVEL": "ERROR",  # vLLM's per-step CPU warnings were 800 of a run's lines
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # "Loading weights" bars of every model load
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "RAY_LOGGER_LEVEL": "error",  # ray.init's default level: its token-auth notice is a warning
    "RAY_SERVE_LOG_TO_STDERR": "0",  # Serve keeps its logs in the session's log folder
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10 warnings (NUMA binding) printed from C++
    "PYTHONWARNINGS": "ignore",  # deprecation warnings from inside the libraries
}

FORMAT = "%(levelname)s %(name)s: %(message)s"


class UsageError(ValueError):
    """A command-line argument that cannot be used; the message starts with the argument."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``--debug`` and ``-v``, whose errors become one line through
    :func:`run_cli` instead of a usage block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="show third-party logs and warnings on the console",
        )

    def error(self, message: str):
        raise UsageError(argument_message(message))


def argument_message(message: str) -> str:
    """argparse's error text as ``<argument>: <reason>``."""
    if message.startswith("argument "):
        return message.removeprefix("argument ")
    prefix = "the following arguments are required: "
    if message.startswith(prefix):
        return f"{message.removeprefix(prefix)}: required"
    prefix = "unrecognized arguments: "
    if message.startswith(prefix):
        return f"{message.removeprefix(prefix)}: unrecognized argument"
    return f"arguments: {message}"


def existing_file(value: str) -> Path:
    """argparse type: a path that must be an existing file."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: not a file")
    return path


def existing_path(value: str) -> Path:
    """argparse type: a path (file or folder) that must exist."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or folder")
    return path


def resolve_device(device: str | None, argument: str = "--device") -> str:
    """``cpu`` or ``cuda``; None picks the GPU when torch sees one. Asking for ``cuda`` without
    one is a usage error, never a silent fall-back to the CPU. DeepSpeed is told the choice
    (``DS_ACCELERATOR``, unless set) instead of guessing it and warning that it fell back."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"{argument} {device}: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{argument} cuda: no CUDA device is visible to torch")
    os.environ.setdefault("DS_ACCELERATOR", device)
    return device


def add_device_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--device cpu|cuda`` of a command that runs ``what`` (say "the policy and MedSAM2");
    left out, :func:`resolve_device` picks the GPU when torch sees one."""
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help=f"cpu or cuda, for {what} (default: the GPU when torch sees one)",
    )


class ConfigPrinted(Exception):
    """``--print-config`` printed the merged config: the command ends here with status 0."""


def add_config_arguments(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    """The arguments of a command that takes a run config: ``--config FILE``, ``--print-config``
    and ``key=value`` overrides after the flags (read with :func:`command_config`)."""
    where = default if default is not None else "none: the defaults of common/config.py"
    parser.add_argument(
        "--config",
        type=existing_file,
        default=default,
        metavar="FILE",
        help=f"run config YAML, configs/*.yaml (default: {where})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the merged config (file + overrides) as YAML and exit, running nothing",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. grpo.lr=1e-6 data.manifest=PATH",
    )


def command_config(
    args: argparse.Namespace,
    overrides: Sequence[str] | None = None,
    load: Callable | None = None,
):
    """The merged config of a command's ``--config`` file and ``overrides`` (default: the
    parsed ``key=value`` arguments), read by ``load(path, overrides)`` (default:
    ``common.config.load_run_config``). With ``--print-config`` it prints the config as YAML
    (``common.config.to_yaml``, which ``load`` reads back to an equal config) and raises
    :class:`ConfigPrinted`, so the command ends with status 0 before it runs anything."""
    from common.config import load_run_config, to_yaml

    load = load or load_run_config
    config = load(args.config, list(args.overrides if overrides is None else overrides))
    if getattr(args, "print_config", False):
        sys.stdout.write(to_yaml(config))
        sys.stdout.flush()
        raise ConfigPrinted
    return config


def one_line(err: BaseException) -> str:
    """The message of a bad-input error, as ``<file or argument>: <reason>`` on one line."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


_running: list[bool] = []  # non-empty while a command runs in this process


def run_cli(
    main: Callable[[list[str]], int],
    argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run ``main(argv)`` under the conventions of this module; returns the exit status.

    ``errors`` adds exception types that mean bad input for this command (say a checkpoint
    error that is not a ``ValueError``). ``--debug`` and ``-v`` are read from ``argv`` before
    ``main`` parses it, so set-up that happens before parsing is quiet or verbose too. What it
    sets up (log handlers, environment, warning filters) is undone when ``main`` returns, so
    calling it twice in one process (tests) starts clean each time; a call inside another (a
    test's ``run_cli`` around a :func:`command`) keeps the outer set-up.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    verbose = bool({"-v", "--verbose"} & set(argv)) or os.environ.get(VERBOSE_ENV) == "1"
    setup = contextlib.nullcontext() if _running else command_logging(verbose)
    with setup:
        _running.append(True)
        try:
            return main(argv)
        except ConfigPrinted:
            return 0
        except (UsageError, *INPUT_ERRORS, *errors) as err:
            if debug:
                traceback.print_exc()
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            return 130
        finally:
            _running.pop()


def command(*errors: type[BaseException]) -> Callable:
    """Decorator of a command's ``main(argv)``: calling it runs it under :func:`run_cli` with
    ``errors`` as more bad-input types, so ``python -m``, a console script (which calls
    ``main()``) and a test's ``main([...])`` all get the one-line errors, the exit status and
    the quiet logs. The undecorated function is ``main.__wrapped__``."""

    def decorate(main: Callable[[list[str]], int]) -> Callable[..., int]:
        @functools.wraps(main)
        def entry(argv: Sequence[str] | None = None) -> int:
            return run_cli(main, argv, errors)

        return entry

    return decorate


class _ProjectOrError(logging.Filter):
    """The console's filter in quiet mode: the project's records, anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".")[0]
        return top in PROJECT_LOGGERS or top == "__main__" or record.levelno >= logging.ERROR


class _Console(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted (pytest swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_file_handlers: list[logging.Handler] = []


@contextlib.contextmanager
def command_logging(verbose: bool) -> Iterator[None]:
    """The logging of one command, undone at the end of the block.

    Console: INFO and up; in quiet mode (not ``verbose``) third-party records only from ERROR
    up, Python warnings only in the log file, and :data:`QUIET_ENVIRONMENT` set for this process
    and the ones it starts. ``MEDVOL_LOG_FILE`` adds a log file (:func:`log_to_file`).
    """
    saved_env = {k: os.environ.get(k) for k in (*QUIET_ENVIRONMENT, VERBOSE_ENV)}
    root = logging.getLogger()
    saved_level = root.level
    console = _Console()
    console.setFormatter(logging.Formatter(FORMAT))
    with warnings.catch_warnings():
        if verbose:
            os.environ[VERBOSE_ENV] = "1"  # the stages a command starts are verbose too
        else:
            for key, value in QUIET_ENVIRONMENT.items():
                os.environ.setdefault(key, value)
            console.addFilter(_ProjectOrError())
            # Warnings raised here become records of "py.warnings": in the log file, off the
            # console (the filter above drops them there).
            logging.captureWarnings(True)
            warnings.simplefilter("default")
        root.setLevel(logging.INFO)
        root.addHandler(console)
        if os.environ.get(LOG_FILE_ENV):
            log_to_file(os.environ[LOG_FILE_ENV])
        try:
            yield
        finally:
            logging.captureWarnings(False)
            for handler in [console, *_file_handlers]:
                root.removeHandler(handler)
                handler.close()
            _file_handlers.clear()
            root.setLevel(saved_level)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def log_to_file(path: str | Path) -> logging.Handler:
    """Send every log record of this process (INFO and up, third-party ones included) to
    ``path`` as well; appends, so the stages of a run can share a folder of logs. A parent
    command's ``MEDVOL_LOG_FILE`` wins over the ``path`` a command picks for itself."""
    if _file_handlers and os.environ.get(LOG_FILE_ENV):
        return _file_handlers[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
    logging.getLogger().addHandler(handler)
    _file_handlers.append(handler)
    return handler


@contextlib.contextmanager
def output_to(path: str | Path | None) -> Iterator[None]:
    """Send what this process and the programs it starts write to stdout and stderr (at the
    file-descriptor level, so C libraries and child processes too) to ``path`` for the block;
    ``None`` changes nothing. For tools whose console output cannot be turned down otherwise
    (``ray start`` prints a page of instructions)."""
    if path is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with path.open("ab") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def removed_on_failure(*paths: Path) -> Iterator[None]:
    """Paths a command is about to create: those that did not exist before are removed when the
    block raises, so a failed command leaves no partial output."""
    new = [Path(p) for p in paths if not Path(p).exists()]
    try:
        yield
    except BaseException:
        for path in new:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
