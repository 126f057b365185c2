"""The `transferkit` command line: inspect a model, fine-tune it on `.npz` data, run the demo.

```text
transferkit [--backend tensorflow|jax|torch] COMMAND ...
transferkit inspect MODEL [--unsafe]
transferkit fit MODEL --data TRAIN.npz [--val VAL.npz] [--freeze-until REF]
                [--head classify:N|regression[:OUTPUTS]] [--lr 1e-4] [--epochs N]
                [--batch-size N] [--cache auto|on|off] [--unsafe] --out OUT.keras
transferkit demo [DEMO ARGS...]
```

Data files are NumPy `.npz` archives with two arrays, `x` (inputs) and `y` (targets):
`np.savez("train.npz", x=images, y=labels)`; they are read without pickles. Models load in Keras'
safe mode (no `Lambda` code, only pure TensorFlow ops in Keras 2 op layers) unless `--unsafe`.

Exit codes: 0 on success; 2 for bad arguments or input transferkit refuses (one line on
stderr: `transferkit <command>: error: ...`); 130 when interrupted; 1 for anything else (a bug,
with its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "parse_head", "parse_layer_ref"]

_EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130
_CACHE_MODES: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}
_BACKENDS = ("tensorflow", "jax", "torch")


class _UsageError(Exception):
    """A one-line message for stderr and exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its error; one line is easier to read in a
    # log and to grep. `--help` still shows the usage.
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")

    def subparser(self, name: str) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                found: argparse.ArgumentParser = action.choices[name]
                return found
        raise KeyError(name)


def parse_head(text: str) -> dict[str, Any]:
    """`classify:N`, `regression` or `regression:OUTPUTS` as `replace_head` keyword arguments.

    Raises:
        argparse.ArgumentTypeError: any other spelling.
    """
    kind, _, count = text.partition(":")
    if kind in ("classify", "classification") and count.isdigit() and int(count) >= 2:
        return {"num_classes": int(count)}
    if kind == "regression" and not count:
        return {"regression": True}
    if kind == "regression" and count.isdigit() and int(count) >= 1:
        return {"regression": True, "outputs": int(count)}
    raise argparse.ArgumentTypeError(
        f"invalid head {text!r}: use classify:N (N >= 2 classes), regression or regression:OUTPUTS"
    )


def parse_layer_ref(text: str) -> int | str:
    """An int index (`-5`, `3`) or a layer name."""
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else text


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_unsafe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="load MODEL with safe_mode=False: runs the Lambda code and any TensorFlow op the "
        "file names. Only for files you trust (see docs/security.md)",
    )


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="transferkit",
        description="Fine-tune pre-trained Keras models from the command line.",
        epilog="Run 'transferkit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--backend",
        choices=_BACKENDS,
        help="the Keras backend to run on (default: KERAS_BACKEND, else tensorflow); "
        "jax and torch need their extra: pip install 'transferkit[jax]'",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="show a model's layers, trainable flags, parameters and inferred loss",
        description="Show a model's layers (nested ones too), trainable flags, parameter "
        "counts, its output activation and the loss transferkit would infer for it.",
    )
    inspect.add_argument("model", metavar="MODEL", help="a .keras or .h5 model file")
    _add_unsafe(inspect)

    fit = commands.add_parser(
        "fit",
        help="fine-tune a model on .npz data and save it",
        description="Fine-tune MODEL on TRAIN.npz (arrays 'x' and 'y', as written by "
        "np.savez(path, x=..., y=...)) with SGD and momentum, then save the trained model.",
    )
    fit.add_argument("model", metavar="MODEL", help="a .keras or .h5 model file")
    fit.add_argument("--data", required=True, metavar="TRAIN.npz", help="training data")
    fit.add_argument("--val", metavar="VAL.npz", help="validation data (same format)")
    fit.add_argument(
        "--freeze-until",
        type=parse_layer_ref,
        metavar="REF",
        help="freeze every layer before REF: a layer name or an int index (-5: train the last "
        "five layers)",
    )
    fit.add_argument(
        "--head",
        type=parse_head,
        metavar="SPEC",
        help="replace the output layer: classify:N or regression[:OUTPUTS] (default: keep it)",
    )
    fit.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (1e-4)")
    fit.add_argument("--epochs", type=_positive_int, default=10, help="epochs (10)")
    fit.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (32)")
    fit.add_argument(
        "--cache",
        choices=("auto", "on", "off"),
        default="auto",
        help="frozen-prefix feature cache: auto (when exact), on (require it), off",
    )
    fit.add_argument("--out", required=True, metavar="OUT.keras", help="where to save (.keras/.h5)")
    _add_unsafe(fit)

    commands.add_parser(
        "demo",
        add_help=False,  # --help shows this description, then the demo's own options
        help="run the few-shot transfer demo (arguments after 'demo' go to the demo)",
        description="Run transferkit's few-shot transfer demo on scikit-learn's digits (needs "
        'the demo extra: pip install "transferkit[demo]"). Any further arguments are passed '
        "to the demo itself.",
    )
    return parser


def _existing_file(path: str, option: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise _UsageError(f"transferkit: error: {option} {path!r}: no such file")
    return p


def _load_npz(path: str, option: str) -> tuple[Any, Any]:
    import numpy as np

    p = _existing_file(path, option)
    try:
        with np.load(p, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            if "x" not in keys or "y" not in keys:
                raise _UsageError(
                    f"transferkit fit: error: {option} {path!r} holds arrays {keys}; it needs "
                    "arrays named 'x' and 'y' (np.savez(path, x=inputs, y=targets))"
                )
            return archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        raise _UsageError(
            f"transferkit fit: error: {option} {path!r} is not a readable .npz archive: {exc}"
        ) from exc


def _check_out(path: str) -> None:
    # Checked before training: finding out after ten epochs that the file cannot be written
    # wastes the run.
    out = Path(path)
    if out.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise _UsageError(f"transferkit fit: error: --out {path!r} must end in .keras or .h5")
    if not out.parent.is_dir():
        raise _UsageError(
            f"transferkit fit: error: --out {path!r}: directory {str(out.parent)!r} does not exist"
        )


def _print_pairs(title: str, pairs: Sequence[tuple[str, str]]) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in pairs:
            table.add_row(key, value)
        Console().print(table)
        return
    width = max(len(k) for k, _ in pairs)
    print(title)
    for key, value in pairs:
        print(f"  {key.ljust(width)}  {value}")


def _describe_loss(model: Any) -> tuple[str, str]:
    from transferkit.compile.spec import infer_loss, output_activation
    from transferkit.errors import TransferkitError

    activation = output_activation(model)
    try:
        loss, metrics = infer_loss(model, None)
    except TransferkitError as exc:
        return activation, f"none ({exc})"
    config = loss.get_config()
    logits = f"(from_logits={config['from_logits']})" if "from_logits" in config else "()"
    names = ", ".join(m if isinstance(m, str) else m.name for m in metrics)
    return activation, f"{type(loss).__name__}{logits}, metrics: {names}"


def _inspect(args: argparse.Namespace) -> int:
    _existing_file(args.model, "MODEL")
    from transferkit import FineTuner

    tuner = FineTuner(args.model, safe_mode=not args.unsafe)
    tuner.print_summary()
    activation, loss = _describe_loss(tuner.model)
    print(f"Output activation: {activation}")
    print(f"Inferred loss: {loss}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    _existing_file(args.model, "MODEL")
    x, y = _load_npz(args.data, "--data")
    validation = _load_npz(args.val, "--val") if args.val else None
    _check_out(args.out)
    from transferkit import FineTuner

    tuner = FineTuner(args.model, safe_mode=not args.unsafe)
    if args.freeze_until is not None:
        tuner.freeze_until(args.freeze_until)
    if args.head is not None:
        tuner.replace_head(**args.head)
    tuner.compile_sgd(lr=args.lr)
    tuner.print_summary()
    result = tuner.fit(
        x,
        y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_data=validation,
        cache=_CACHE_MODES[args.cache],
        # Progress bars on a terminal, one line per epoch in a log.
        verbose=1 if sys.stdout.isatty() else 2,
    )
    saved = result.save(args.out)
    pairs = [
        ("epochs", str(result.epochs)),
        (f"best {result.monitor}", f"{result.best:.4g} (epoch {result.best_epoch})"),
        *((k, f"{v:.4g}") for k, v in result.metrics.items()),
        ("trainable params", f"{result.trainable_params:,}"),
        ("feature cache", (result.cache_layer or "yes") if result.cached else "no"),
        ("seconds", f"{result.seconds:.1f}"),
        ("saved", str(saved)),
    ]
    if result.interrupted:
        pairs.append(("interrupted", "yes"))
    if result.diverged:
        pairs.append(("diverged", "yes (weights rolled back)"))
    _print_pairs("Result", pairs)
    return 0


def _demo(parser: _Parser, extra: Sequence[str]) -> int:
    wants_help = "-h" in extra or "--help" in extra
    if wants_help:
        demo_parser = parser.subparser("demo")
        print(
            demo_parser.format_help().replace(
                "usage: transferkit demo", "usage: transferkit demo [DEMO ARGS...]", 1
            )
        )
    try:
        demo = importlib.import_module("transferkit.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "transferkit.demo":
            raise
        if wants_help:
            return 0
        raise _UsageError(
            "transferkit demo: error: this installation of transferkit has no demo module"
        ) from exc
    if wants_help:
        print("Options of the demo itself:")
        try:
            demo.main(["--help"])
        except SystemExit as stop:  # argparse's --help exits
            return int(stop.code or 0)
        return 0
    code = demo.main(list(extra))
    return int(code or 0)


def _select_backend(name: str) -> None:
    # Keras reads KERAS_BACKEND once, when it is first imported; nothing here has imported it.
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != name:
        raise _UsageError(
            f"transferkit: error: --backend {name}, but Keras was already imported with the "
            f"{keras.backend.backend()} backend; set KERAS_BACKEND={name} instead"
        )
    if importlib.util.find_spec(name) is None:
        raise _UsageError(
            f"transferkit: error: --backend {name} needs the {name} package: "
            f"pip install 'transferkit[{name}]'"
        )
    os.environ["KERAS_BACKEND"] = name


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `transferkit` command line.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit code (0 success, 2 bad arguments or input, 130 interrupted).
    """
    # Must precede the first TensorFlow import (oneDNN crashes on some 1x1 stride-2 convolutions
    # on AVX-512 CPUs); transferkit/__init__.py does the same for `python -m transferkit` and the
    # console script, which import the package before this function runs.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    args_in = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_in if a in ("inspect", "fit", "demo")), "")
    parser = _build_parser()
    try:
        args, extra = parser.parse_known_args(args_in)
        if args.command != "demo" and extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.backend is not None:
            _select_backend(args.backend)
        if args.version:
            from transferkit._version import __version__

            print(f"transferkit {__version__}")
            return 0
        if args.command is None:
            parser.print_help()
            return _EXIT_USAGE
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "fit":
            return _fit(args)
        return _demo(parser, extra)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print("transferkit: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except Exception as exc:
        from transferkit.errors import TransferkitError

        if not isinstance(exc, TransferkitError):
            raise
        message = " ".join(str(exc).split())
        if "safe_mode=False" in message:
            message += " (on the command line: --unsafe)"
        print(f"transferkit {command}: error: {message}".replace("  ", " "), file=sys.stderr)
        return _EXIT_USAGE
