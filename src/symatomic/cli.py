"""Command line: ``symatomic train | export | eval``."""

import argparse
import datetime
import logging
import os
import sys
import time
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
    from .options import load_options
    from .train import Trainer

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
    options = load_options(options_path)
    if args.epochs is not None:
        options["architecture"]["training"]["num_epochs"] = args.epochs

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
    os.makedirs(output_dir, exist_ok=True)
    if is_main:
        _setup_logging(os.path.join(output_dir, "train.log"))
    else:
        LOGGER.setLevel(logging.WARNING)
    LOGGER.info(
        "symatomic train: options from %s, results in %s", options_path, output_dir
    )
    start = time.perf_counter()
    trainer = Trainer(
        options, output_dir, restart=args.restart, progress=not args.no_progress
    )
    result = trainer.run()
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
    trainer.context.close()
    return 0


# ------------------------------------------------------------------------ export


def _export(args: argparse.Namespace) -> int:
    from .train import export_model, model_from_checkpoint

    _setup_logging()
    model = model_from_checkpoint(args.checkpoint, args.weights, args.ecse)
    if os.path.exists(args.output) and not args.force:
        raise SystemExit(f"error: '{args.output}' exists; pass --force to replace it")
    export_model(model, args.output)
    LOGGER.info("exported %s to %s", args.checkpoint, os.path.abspath(args.output))
    return 0


# -------------------------------------------------------------------------- eval


def _eval(args: argparse.Namespace) -> int:
    import metatomic.torch

    from . import io
    from .data.readers import read_dataset, read_targets_into
    from .data.targets import GradientSpec
    from .train.losses import error_unit

    _setup_logging()
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"model '{args.model}' does not exist")
    model = metatomic.torch.load_atomistic_model(args.model)
    capabilities = model.capabilities()
    specs = io.model_target_specs(model)
    names = list(capabilities.outputs.keys())
    predictions = io.predict(model, args.structures, names, batch_size=args.batch_size)

    if args.output is not None:
        stem, extension = os.path.splitext(args.output)
        extension = extension or ".mts"
        for name, tensor in predictions.items():
            path = (
                stem + extension
                if len(predictions) == 1
                else f"{stem}-{name.replace('::', '_').replace('/', '_')}{extension}"
            )
            io.save(path, tensor)
            LOGGER.info("predictions of '%s' written to %s", name, path)

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
    for name, (structures, spec) in available.items():
        reference = io.targets_to_tensormap(spec, structures)
        predicted = predictions[name]
        squared = 0.0
        absolute = 0.0
        count = 0
        for key, block in reference.items():
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
            import torch

            reference_forces = torch.cat([s.forces[name] for s in structures])
            difference = -gradient.values.reshape(-1, 3) - reference_forces
            LOGGER.info(
                "  %-30s RMSE %.5g  MAE %.5g  %s",
                name + "/forces",
                float((difference**2).mean()) ** 0.5,
                float(difference.abs().mean()),
                error_unit(specs, name + "/forces", length_unit),
            )
    return 0


# --------------------------------------------------------------------- symmetrize


def _symmetrize(args: argparse.Namespace) -> int:
    import metatomic.torch

    from .symmetrize import symmetrize_model
    from .train import export_model

    _setup_logging()
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"model '{args.model}' does not exist")
    if os.path.exists(args.output) and not args.force:
        raise SystemExit(f"error: '{args.output}' exists; pass --force to replace it")
    model = metatomic.torch.load_atomistic_model(args.model)
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
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a model from an options file (metatrain's layout)"
    )
    train.add_argument("options", nargs="?", help="options file (YAML)")
    train.add_argument(
        "--example",
        action="store_true",
        help="train on the bundled example (water clusters, B3LYP) and export it",
    )
    train.add_argument(
        "-o", "--output-dir", help="folder of the results (default outputs/<date-time>)"
    )
    train.add_argument("--restart", help="resume exactly from this checkpoint")
    train.add_argument("--epochs", type=int, help="override the number of epochs")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(function=_train)

    export = commands.add_parser(
        "export", help="export a checkpoint to a metatomic .pt model"
    )
    export.add_argument("checkpoint")
    export.add_argument("-o", "--output", default="model.pt")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.add_argument(
        "--ecse",
        choices=["none", "local"],
        help="evaluate the model with (local) ECSE in every layer: exactly "
        "O(3)-equivariant version of a PET trained without it",
    )
    export.add_argument(
        "--weights",
        choices=["best", "last"],
        default="best",
        help="weights of the best validation epoch (default) or of the last epoch",
    )
    export.set_defaults(function=_export)

    evaluate = commands.add_parser(
        "eval", help="evaluate a metatomic model on structures, write TensorMaps"
    )
    evaluate.add_argument("model", help="exported .pt model")
    evaluate.add_argument("structures", help="file readable by ASE")
    evaluate.add_argument("-o", "--output", help="predictions file (.mts)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.set_defaults(function=_eval)

    symmetrize = commands.add_parser(
        "symmetrize",
        help="make any exported metatomic model exactly O(3)-equivariant (global ECSE)",
    )
    symmetrize.add_argument("model", help="exported .pt model")
    symmetrize.add_argument("-o", "--output", default="model-ecse.pt")
    symmetrize.add_argument("--so3", action="store_true", help="rotations only")
    symmetrize.add_argument(
        "--cutoff", type=float, help="neighbor cutoff of the frames (default: model's)"
    )
    symmetrize.add_argument(
        "--max-lambda", type=int, default=6, help="largest o3_lambda of the outputs"
    )
    symmetrize.add_argument("--force", action="store_true", help="replace the output")
    symmetrize.set_defaults(function=_symmetrize)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.function(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        if os.environ.get("SYMATOMIC_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
