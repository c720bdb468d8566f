"""Command line: ``symatomic train | export | eval | symmetrize``.

A mistake of the user (a missing file, a bad option, a corrupt checkpoint, too little
memory, Ctrl-C) ends the command with one line on stderr, never a traceback; set
``SYMATOMIC_DEBUG=1`` to see the traceback.
"""

import argparse
import datetime
import importlib.metadata
import logging
import os
import re
import signal
import sys
import time
import warnings
from importlib import resources
from typing import Dict, List, Optional

__all__ = ["main"]

LOGGER = logging.getLogger("symatomic")


def example_options_path() -> str:
    """Path of the bundled example options file (water clusters, PySCF data)."""
    return str(resources.files("symatomic") / "examples" / "options.yaml")


def _setup_logging(log_file: Optional[str] = None) -> None:
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(console)
    if log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        LOGGER.addHandler(file_handler)
    # loggers of the submodules write through the package logger
    for name in ("symatomic.data.readers", "symatomic.data.sets", "symatomic.options"):
        logging.getLogger(name).setLevel(logging.INFO)
    _show_symatomic_warnings_in_log()


def _show_symatomic_warnings_in_log() -> None:
    """Warnings of symatomic (overlapping atoms…) become one log line
    ``warning: …`` instead of Python's ``file:line: Category: …``."""
    original = warnings.showwarning
    if getattr(original, "_symatomic", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        # by name: importing symatomic.data here would import torch
        if category.__name__ == "OverlappingAtomsWarning":
            LOGGER.warning("warning: %s", message)
        else:
            original(message, category, filename, lineno, file, line)

    show._symatomic = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def version() -> str:
    """The installed version of symatomic."""
    try:
        return importlib.metadata.version("symatomic")
    except importlib.metadata.PackageNotFoundError:  # a plain source checkout
        from . import __version__

        return __version__


def _format_errors(errors: Dict[str, float], specs, length_unit: str) -> List[str]:
    from .train.losses import error_unit

    lines = []
    for key in sorted(k for k in errors if not k.startswith("mae:") and k != "loss"):
        unit = error_unit(specs, key, length_unit)
        mae = errors.get("mae:" + key)
        text = f"  {key:<45s} RMSE {errors[key]:.5g}"
        if mae is not None:
            text += f"  MAE {mae:.5g}"
        lines.append(text + (f"  {unit}" if unit else ""))
    return lines


# ------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from .files import interrupted
    from .options import load_options
    from .train import Trainer
    from .train.budget import parse_duration

    if args.example:
        if args.options is not None:
            raise SystemExit(
                "error: give either an options file or --example, not both"
            )
        options_path = example_options_path()
    elif args.options is None:
        raise SystemExit(
            "error: give an options file (or --example for the bundled one)"
        )
    else:
        options_path = args.options
    if args.epochs is not None and args.epochs < 0:
        raise ValueError(f"--epochs must not be negative, got {args.epochs}")
    time_limit = parse_duration(args.time_limit, "--time-limit")
    options = load_options(options_path)
    if args.epochs is not None:
        options["architecture"]["training"]["num_epochs"] = args.epochs
    if args.time_limit is not None:
        options["architecture"]["training"]["time_limit"] = args.time_limit
    args.memory_hint = (
        "reduce architecture.training.batch_size (now "
        f"{options['architecture']['training']['batch_size']}), the model "
        "(d_pet, d_node, num_gnn_layers, cutoff) or the size of the structures"
    )

    output_dir = args.output_dir
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    is_main = int(os.environ.get("RANK", "0")) == 0
    if output_dir is None and distributed:
        raise SystemExit(
            "error: give --output-dir in distributed runs (every process must use the "
            "same folder)"
        )
    if output_dir is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        output_dir = os.path.join("outputs", stamp)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output-dir '{output_dir}' is a file, not a folder")
    for name in ("model.ckpt", "last.ckpt", "model.pt"):
        existing = os.path.join(output_dir, name)
        if (
            is_main
            and os.path.exists(existing)
            and (
                args.restart is None
                or os.path.abspath(args.restart) != os.path.abspath(existing)
            )
        ):
            raise SystemExit(
                f"error: '{existing}' already exists; choose another --output-dir so "
                "that no earlier result is overwritten"
            )
    if args.restart is not None and os.path.dirname(
        os.path.abspath(args.restart)
    ) == os.path.abspath(output_dir):
        raise SystemExit(
            "error: resume into a new --output-dir: the checkpoint you restart from is "
            "never overwritten"
        )
    if args.restart is not None and not os.path.exists(args.restart):
        raise FileNotFoundError(f"checkpoint '{args.restart}' does not exist")
    os.makedirs(output_dir, exist_ok=True)
    if is_main:
        _setup_logging(os.path.join(output_dir, "train.log"))
    else:
        LOGGER.setLevel(logging.WARNING)
    LOGGER.info(
        "symatomic train: options from %s, results in %s", options_path, output_dir
    )
    start = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(
            options,
            output_dir,
            restart=args.restart,
            progress=not args.no_progress,
            time_limit=time_limit,
            started=args.started,
        )
        result = trainer.run()
    except BaseException as error:
        if not interrupted(error):
            raise
        if is_main:
            if sys.stderr.isatty():
                print(file=sys.stderr)  # past a progress bar
            options_argument = "--example" if args.example else options_path
            if args.time_limit is not None:
                # the rest of the limit: the checkpoint knows the time used
                options_argument += f" --time-limit {args.time_limit}"
            print(_interrupted(trainer, options_argument, output_dir), file=sys.stderr)
        return 130
    if not trainer.context.is_main:
        return 0
    specs = trainer.model.target_specs
    length_unit = trainer.model.length_unit
    LOGGER.info("")
    LOGGER.info(
        "training finished in %.1f min; best epoch %d",
        (time.perf_counter() - start) / 60,
        result.best_epoch,
    )
    if result.validation_errors:
        LOGGER.info("validation errors of the exported model:")
        for line in _format_errors(result.validation_errors, specs, length_unit):
            LOGGER.info(line)
    if result.test_errors:
        LOGGER.info("test errors of the exported model:")
        for line in _format_errors(result.test_errors, specs, length_unit):
            LOGGER.info(line)
    LOGGER.info("checkpoint:     %s", os.path.abspath(result.checkpoint))
    LOGGER.info("exported model: %s", os.path.abspath(result.exported_model))
    if result.plots:
        LOGGER.info(
            "parity plots:   %s",
            ", ".join(os.path.relpath(path, output_dir) for path in result.plots),
        )
    trainer.context.close()
    return 0


def _interrupted(trainer, options: str, output_dir: str) -> str:
    """The line printed when a training is interrupted: where its last checkpoint
    is and the command that resumes or exports it."""
    last = getattr(trainer, "last_checkpoint", None)
    stage = getattr(trainer, "stage", "setup")
    if stage in ("finishing", "done"):
        exported = os.path.join(output_dir, "model.pt")
        if os.path.exists(exported):
            return f"interrupted after the export: the model is complete in {exported}"
        best = os.path.join(output_dir, "model.ckpt")
        source = best if os.path.exists(best) else last
        return (
            "interrupted after the last epoch, before the export was complete: "
            f"finish with 'symatomic export {source} -o {exported}'"
        )
    if last is None or (stage == "setup" and trainer.last_epoch is None):
        if last is not None:
            return (
                "interrupted before the first epoch of this run, nothing new was "
                f"saved: run the same command again to resume from {last}"
            )
        return (
            "interrupted before the first epoch finished: nothing was saved; run "
            "the same command again to start over"
        )
    epochs = f" (epoch {trainer.last_epoch} of {trainer.num_epochs})"
    return (
        f"interrupted: the last checkpoint is {last}{epochs}; resume with "
        f"'symatomic train {options} --restart {last} -o NEW_FOLDER', or export it "
        f"with 'symatomic export {last} -o model.pt'"
    )


# ------------------------------------------------------------------------ export


def _export(args: argparse.Namespace) -> int:
    from .files import check_output_file

    _setup_logging()
    check_output_file(args.output, args.force)
    from .train import export_model, model_from_checkpoint

    model = model_from_checkpoint(args.checkpoint, args.weights, args.ecse)
    export_model(model, args.output)
    LOGGER.info("exported %s to %s", args.checkpoint, os.path.abspath(args.output))
    return 0


# -------------------------------------------------------------------------- eval


def _output_paths(output: str, names: List[str]) -> Dict[str, Dict[str, str]]:
    """The predictions (``.mts``) and parity plot (``.png``) files of every output:
    ``output`` itself for a single output, else ``<stem>-<name><ext>``."""
    from .plots import file_safe

    stem, extension = os.path.splitext(output)
    extension = extension or ".mts"
    paths = {}
    for name in names:
        predictions = (
            stem + extension
            if len(names) == 1
            else f"{stem}-{file_safe(name)}{extension}"
        )
        plot = f"{stem}-parity-{file_safe(name)}.png"
        paths[name] = {"predictions": predictions, "plot": plot}
    return paths


def _eval(args: argparse.Namespace) -> int:
    from .files import check_output_file

    _setup_logging()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.output is not None:
        check_output_file(args.output, True, "predictions file")  # not a folder
    if not os.path.exists(args.structures):
        raise FileNotFoundError(f"structure file '{args.structures}' does not exist")

    import torch

    from . import io
    from .data.readers import read_dataset, read_targets_into
    from .data.structures import read_frames
    from .data.targets import GradientSpec
    from .plots import ParityData, block_label, write_parity_plot
    from .train.losses import error_unit

    args.memory_hint = (
        f"reduce --batch-size (now {args.batch_size}; 1 needs the least memory) or "
        "evaluate smaller structures"
    )
    model = io.load_model(args.model)
    capabilities = model.capabilities()
    specs = io.model_target_specs(model)
    names = io.default_outputs(capabilities)
    paths = _output_paths(args.output, names) if args.output is not None else {}
    # refuse before the work, like export
    for name, files in paths.items():
        check_output_file(files["predictions"], args.force, "predictions file")
        if name in specs:
            check_output_file(files["plot"], args.force, "parity plot")
    read_frames(args.structures)  # a missing or unreadable file fails now
    predictions = io.predict(model, args.structures, names, batch_size=args.batch_size)

    for name, tensor in predictions.items():
        if name in paths:
            io.save(paths[name]["predictions"], tensor)
            LOGGER.info(
                "predictions of '%s' written to %s", name, paths[name]["predictions"]
            )

    # errors against reference values present in the structures file
    if not specs:
        LOGGER.info("(not a symatomic model: no description of reference values)")
        return 0
    targets = {}
    for name, spec in specs.items():
        entry = {"key": spec.key, "unit": spec.unit, "sample_kind": spec.sample_kind}
        if spec.kind == "cartesian":
            entry["type"] = {"cartesian": {"rank": spec.rank}}
        elif spec.kind == "spherical":
            entry["type"] = {
                "spherical": {
                    "irreps": [
                        {"o3_lambda": b.o3_lambda, "o3_sigma": b.o3_sigma}
                        for b in spec.blocks
                    ]
                }
            }
        if spec.is_energy:
            # gradients are compared when the file has them
            entry["forces"] = False
            entry["stress"] = False
        targets[name] = entry
    available = {}
    for name, entry in targets.items():
        try:
            structures, read_specs, _ = read_dataset(
                {"systems": args.structures, "targets": {name: entry}},
                "reference values",
                {name: specs[name]},
            )
            spec = read_specs[name]
            if spec.is_energy and specs[name].forces is not None:
                spec.forces = GradientSpec(args.structures, specs[name].forces.key)
                spec.optional_gradients.append("forces")
                read_targets_into(structures, {name: spec})
            available[name] = (structures, spec)
        except (KeyError, ValueError) as error:
            LOGGER.info(
                "no reference values for '%s' in %s (%s)", name, args.structures, error
            )
    if not available:
        return 0
    LOGGER.info("errors against the reference values in %s:", args.structures)
    length_unit = capabilities.length_unit
    parity = ParityData()
    for name, (structures, spec) in available.items():
        reference = io.targets_to_tensormap(spec, structures)
        predicted = predictions[name]
        squared = 0.0
        absolute = 0.0
        count = 0
        for block_spec, key, block in zip(
            spec.blocks, reference.keys, reference.blocks()
        ):
            values = predicted.block(key).values
            if spec.per_atom:
                # predictions hold every atom; reference blocks may be per atom type
                rows = predicted.block(key).samples.values
                wanted = block.samples.values
                index = {tuple(r.tolist()): i for i, r in enumerate(rows)}
                values = values[[index[tuple(r.tolist())] for r in wanted]]
            difference = values - block.values
            squared += float((difference**2).sum())
            absolute += float(difference.abs().sum())
            count += difference.numel()
            parity.add(
                name, block_label(spec, block_spec), block.values, values, spec.unit
            )
        if spec.kind == "cartesian":
            count = len(structures) * 3**spec.rank * spec.num_subtargets
        unit = error_unit(specs, name, length_unit)
        LOGGER.info(
            "  %-30s RMSE %.5g  MAE %.5g  %s",
            name,
            (squared / count) ** 0.5,
            absolute / count,
            unit,
        )
        if spec.is_energy and all(name in s.forces for s in structures):
            gradient = predicted.block().gradient("positions")
            reference_forces = torch.cat([s.forces[name] for s in structures])
            predicted_forces = -gradient.values.reshape(-1, 3)
            difference = predicted_forces - reference_forces
            forces_unit = error_unit(specs, name + "/forces", length_unit)
            LOGGER.info(
                "  %-30s RMSE %.5g  MAE %.5g  %s",
                name + "/forces",
                float((difference**2).mean()) ** 0.5,
                float(difference.abs().mean()),
                forces_unit,
            )
            parity.add(name, "forces", reference_forces, predicted_forces, forces_unit)
    if paths:
        for name, panels in parity.targets.items():
            write_parity_plot(
                paths[name]["plot"],
                f"{name} ({os.path.basename(args.structures)})",
                list(panels.values()),
            )
            LOGGER.info("parity plot of '%s' written to %s", name, paths[name]["plot"])
    return 0


# --------------------------------------------------------------------- symmetrize


def _symmetrize(args: argparse.Namespace) -> int:
    from .files import check_output_file

    _setup_logging()
    check_output_file(args.output, args.force)
    from . import io
    from .symmetrize import symmetrize_model
    from .train import export_model

    model = io.load_model(args.model)
    symmetrized = symmetrize_model(
        model, inversion=not args.so3, cutoff=args.cutoff, max_lambda=args.max_lambda
    )
    export_model(symmetrized, args.output)
    LOGGER.info(
        "exactly %s-equivariant model (global ECSE, infinite interaction range) "
        "written to %s",
        "SO(3)" if args.so3 else "O(3)",
        os.path.abspath(args.output),
    )
    return 0


# -------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="symatomic",
        description="Train, export and evaluate exactly symmetric models of atoms.",
        epilog="Set SYMATOMIC_DEBUG=1 to see tracebacks instead of one-line errors.",
    )
    parser.add_argument("--version", action="version", version=f"symatomic {version()}")
    parser.set_defaults(function=None, memory_hint="")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model from an options file (metatrain's layout)",
        description="Train a model and export it to OUTPUT_DIR/model.pt.",
    )
    train.add_argument(
        "options",
        nargs="?",
        help="options file (YAML, metatrain's layout); required unless --example",
    )
    train.add_argument(
        "--example",
        action="store_true",
        help="train on the bundled example (water clusters, B3LYP) instead of an "
        "options file (default: off)",
    )
    train.add_argument(
        "-o",
        "--output-dir",
        help="folder of the results; must not hold a finished run (default: "
        "outputs/<date-time>)",
    )
    train.add_argument(
        "--restart",
        metavar="CHECKPOINT",
        help="resume exactly from this checkpoint, e.g. run/last.ckpt, into a new "
        "--output-dir (default: start from scratch)",
    )
    train.add_argument(
        "--epochs",
        type=int,
        help="number of epochs, replaces architecture.training.num_epochs (default: "
        "the options file's)",
    )
    train.add_argument(
        "--time-limit",
        metavar="DURATION",
        help="wall-clock limit of the whole run, e.g. 90s, 10m, 1.5h: the epochs and "
        "the learning-rate schedule are planned to end within it, calibration and "
        "export included, and num_epochs becomes a cap; with backbone: auto the "
        "backbone is chosen by short probes on your data (replaces "
        "architecture.training.time_limit; default: the options file's, else none)",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (default: shown)",
    )
    train.set_defaults(function=_train)

    export = commands.add_parser(
        "export",
        help="export a checkpoint to a metatomic .pt model",
        description="Export a checkpoint to a metatomic .pt model.",
    )
    export.add_argument("checkpoint", help="checkpoint, e.g. run/model.ckpt")
    export.add_argument(
        "-o",
        "--output",
        default="model.pt",
        help="the exported model file (default: model.pt)",
    )
    export.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output file (default: refuse)",
    )
    export.add_argument(
        "--ecse",
        choices=["none", "local"],
        help="evaluate the model with (local) ECSE in every layer: exactly "
        "O(3)-equivariant version of a PET trained without it; none: without ECSE "
        "(default: the checkpoint's setting)",
    )
    export.add_argument(
        "--weights",
        choices=["best", "last"],
        default="best",
        help="weights of the best validation epoch or of the last epoch (default: "
        "best)",
    )
    export.set_defaults(function=_export)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a metatomic model on structures, write TensorMaps",
        description="Evaluate an exported model on structures; print the errors "
        "against the reference values the file holds.",
    )
    evaluate.add_argument("model", help="exported .pt model")
    evaluate.add_argument("structures", help="structures file readable by ASE")
    evaluate.add_argument(
        "-o",
        "--output",
        metavar="PREDICTIONS.mts",
        help="write the predictions to this TensorMap file; with several outputs one "
        "file per output, <stem>-<name>.mts (predictions-energy.mts, "
        "predictions-mtt_dipole.mts for -o predictions.mts), and, where the "
        "structures have reference values, parity plots <stem>-parity-<name>.png "
        "(default: write nothing, print the errors only)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="structures evaluated together; lower it when memory runs out "
        "(default: 16)",
    )
    evaluate.add_argument(
        "--force",
        action="store_true",
        help="replace existing predictions and plots (default: refuse)",
    )
    evaluate.set_defaults(function=_eval)

    symmetrize = commands.add_parser(
        "symmetrize",
        help="make any exported metatomic model exactly O(3)-equivariant (global ECSE)",
        description="Make any exported metatomic model exactly O(3)-equivariant "
        "with global ECSE.",
    )
    symmetrize.add_argument("model", help="exported .pt model")
    symmetrize.add_argument(
        "-o",
        "--output",
        default="model-ecse.pt",
        help="the symmetrized model file (default: model-ecse.pt)",
    )
    symmetrize.add_argument(
        "--so3",
        action="store_true",
        help="rotations only, no inversion (default: O(3), with inversion)",
    )
    symmetrize.add_argument(
        "--cutoff",
        type=float,
        help="neighbor cutoff of the frames (default: the model's)",
    )
    symmetrize.add_argument(
        "--max-lambda",
        type=int,
        default=6,
        help="largest o3_lambda of the outputs (default: 6)",
    )
    symmetrize.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output file (default: refuse)",
    )
    symmetrize.set_defaults(function=_symmetrize)
    return parser


#: messages of allocators that ran out of memory (CPU, CUDA, the OS)
_OUT_OF_MEMORY = re.compile(
    r"can't allocate memory|out of memory|Cannot allocate memory|not enough memory|"
    r"OutOfMemoryError",
    re.IGNORECASE,
)


def out_of_memory_message(error: BaseException, hint: str = "") -> Optional[str]:
    """One line for an out-of-memory error (``None`` for other errors): how much
    memory the failed allocation asked for, and what to reduce."""
    text = str(error)
    if not isinstance(error, MemoryError) and not _OUT_OF_MEMORY.search(text):
        return None
    asked = ""
    match = re.search(r"you tried to allocate (\d+) bytes", text)
    if match:
        asked = _format_bytes(int(match.group(1)))
    else:
        match = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B)", text)
        if match:
            asked = match.group(1)
    line = "error: out of memory"
    if asked:
        line += f": an allocation of {asked} failed"
    return line + (f"; {hint}" if hint else "")


def _format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} bytes"


def _terminated(signum, frame):
    """SIGTERM (a job scheduler, ``kill``) stops the work like Ctrl-C: temporary
    files are removed and the command says where things stand."""
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    started = time.monotonic()
    args = parser.parse_args(argv)
    args.started = started
    if args.function is None:
        parser.print_help()
        return 0
    from .allocator import tune_allocator

    # keep large freed blocks for reuse (1.1-1.8x faster on big systems)
    tune_allocator()
    debug = bool(os.environ.get("SYMATOMIC_DEBUG"))
    show_warning = warnings.showwarning
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread
        pass
    try:
        return args.function(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"interrupted: symatomic {args.command} did not finish", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as error:
        message = out_of_memory_message(error, args.memory_hint)
        if debug or message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show_warning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
