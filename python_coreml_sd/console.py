"""Console set-up shared by the CLIs: one-line errors, quiet third-party chatter."""
import argparse
import functools
import logging
import os
import signal
import sys
import warnings
from typing import NoReturn


def handle_interrupts(prog: str) -> None:
    """Ctrl-C honoured from the first second: SIGINT raises KeyboardInterrupt even where the parent
    process ignored it (a shell's background job), and one that escapes main (during the start-up
    imports) ends as one line and exit 130 instead of a traceback. finally blocks still run first."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print(f"{prog}: error: interrupted; no partial output was kept", file=sys.stderr, flush=True)
            os._exit(130)
        previous(kind, value, traceback)

    sys.excepthook = hook


# Libraries that set their own log levels (and handlers) when imported: raised to errors.
NOISY_LIBRARIES = ("coremltools", "transformers", "diffusers", "torch", "huggingface_hub")


def quiet_third_party(verbose: bool = False, converters: bool = True) -> None:
    """Hide the warnings and per-pass progress bars of torch tracing and coremltools.

    Users see our own per-component progress instead; `--verbose` shows everything. With
    ``converters=False`` transformers and coremltools are not imported for it (a tool that may not
    use them starts 10 s sooner; their loggers are still quiet if they load later).
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # huggingface_hub sets its level when imported
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Any other library's log lines (PIL, numexpr...) must not precede our one-line error either: the root
    # handler passes errors, and our own loggers (python_coreml_sd.*) with their info lines.
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("python_coreml_sd").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ours_or_errors)
    if not converters:
        return
    try:
        import transformers
        import diffusers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    for name in NOISY_LIBRARIES:  # again: the imports above may have set their own
        logging.getLogger(name).setLevel(logging.ERROR)
    _silence_coremltools_progress()


def _ours_or_errors(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or record.name == "python_coreml_sd" or record.name.startswith("python_coreml_sd.")


def quiet_start(argv=None) -> None:
    """quiet_third_party before a CLI's slow imports (torch, diffusers), from its `__main__` block: what
    those imports warn about must not precede an error either. Imports nothing heavy itself."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party("--verbose" in argv, converters=False)


def show_own_warnings(prog: str) -> None:
    """Our UserWarnings (a truncated prompt) as one `prog: warning:` line each; other libraries' stay hidden."""
    warnings.filterwarnings("always", category=UserWarning, module=r"python_coreml_sd(\.|$)")
    warnings.showwarning = lambda message, *args, **kwargs: print(f"{prog}: warning: {message}", file=sys.stderr)


def _silence_coremltools_progress() -> None:
    # coremltools draws a progress bar per graph pass with no switch to turn it off.
    from tqdm import tqdm
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.mil.passes import pass_pipeline
    from coremltools.optimize.coreml import _quantization_passes
    ops._tqdm = functools.partial(tqdm, disable=True)
    pass_pipeline.tqdm = functools.partial(tqdm, disable=True)
    _quantization_passes.tqdm = functools.partial(tqdm, disable=True)


def fail(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def run_cli(prog: str, body, interrupted: str = "interrupted; no partial output was kept") -> int:
    """`body()`'s exit status; a UserError or CheckFailed ends as one `prog: error:` line and its exit code,
    Ctrl-C as `interrupted` and 130."""
    from .errors import CheckFailed, UserError
    try:
        return body()
    except (UserError, CheckFailed) as exc:
        fail(prog, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail(prog, interrupted, 130)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (not usage + error) and exits 2."""

    def error(self, message):
        fail(self.prog, f"{message} (see --help)", 2)
