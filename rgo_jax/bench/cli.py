"""``rgo-bench`` / ``python -m rgo_jax``: run a continual-learning benchmark from the shell."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import rgo_jax
from rgo_jax.bench import _profile
from rgo_jax.bench._methods import METHODS, OPTION_ALIASES, check_method_options, option_help
from rgo_jax.bench._protocols import PROTOCOLS
from rgo_jax.bench._rundir import end_progress_bars, interrupted_message
from rgo_jax.bench._validate import RunError, check_fields, config_root
from rgo_jax.bench.train import BENCHMARKS, STREAMS, Config, run

DEMO = {
    "benchmark": "permuted_digits",
    "methods": ["rgo", "sgd"],
    "num_tasks": 5,
    "steps_per_task": 500,
    "consolidation_batches": 300,
    "hidden": [256, 256],
    "seeds": [0],
}
"""The default job: permuted scikit-learn digits (bundled, no download), RGO vs SGD."""

_FLAGS = {
    # flag: (Config field, type, help)
    "--benchmark": (
        "benchmark",
        str,
        f"task stream: {', '.join(sorted(BENCHMARKS))}; one with a paper protocol "
        f"({', '.join(sorted(PROTOCOLS))}) runs it (benchmarks/configs/<name>.json) "
        "unless flags say otherwise",
    ),
    "--dataset": (
        "dataset",
        str,
        "a data set of your own instead of --benchmark: a name the loaders know "
        "(mnist, notmnist, ...; <name>.npz in --data-dir) or a path to an .npz file "
        "(x_train, y_train, x_test, y_test); needs --stream",
    ),
    "--stream": ("stream", str, f"how --dataset becomes tasks: {', '.join(STREAMS)}"),
    "--classes-per-task": (
        "classes_per_task",
        int,
        "classes per task of a split stream (default: the classes divided among --tasks; "
        "without --tasks, 2 per task and as many tasks as that makes)",
    ),
    "--methods": ("methods", "list", f"comma-separated methods: {', '.join(sorted(METHODS))}"),
    "--model": ("model", str, "network: mlp, alexnet, resnet18, reduced_resnet18"),
    "--hidden": (
        "hidden",
        "intlist",
        "MLP hidden widths (default 256,256) or AlexNet's fc widths (default 2048,2048)",
    ),
    "--width": ("width", int, "ResNet width (64 = ResNet-18, 20 = reduced)"),
    "--init": (
        "init",
        str,
        "parameter initialisation: lecun (Flax's default), torch, glorot or normal0.1",
    ),
    "--init-scale": ("init_scale", float, "multiply every initial kernel by this (default 1)"),
    "--tasks": ("num_tasks", int, "number of tasks"),
    "--steps": ("steps_per_task", int, "SGD steps per task (paper: 1000 MNIST, 2000 CIFAR)"),
    "--batch-size": ("batch_size", int, "mini-batch size (paper: 10)"),
    "--lr": ("learning_rate", float, "SGD learning rate (paper: 0.1 MNIST, 0.03 CIFAR)"),
    "--alpha": (
        "alpha",
        float,
        "RGO's RLS regulariser, option rgo.alpha (reference code 0.01; paper text 1)",
    ),
    "--consolidation-batches": (
        "consolidation_batches",
        int,
        "batches in RGO's consolidation pass, option rgo.consolidation_batches "
        "(reference: 1000 MNIST)",
    ),
    "--rls-method": (
        "rls_method",
        str,
        "RGO's RLS kernel, option rgo.rls_method: block (Woodbury, fast) or sequential",
    ),
    "--seeds": ("seeds", "intlist", "comma-separated seeds, e.g. 0,1,2,3,4"),
    "--data-dir": (
        "data_dir",
        str,
        "folder with the data sets (else $RGO_DATA_DIR, ~/.cache/rgo_jax)",
    ),
    "--max-train-per-task": ("max_train_per_task", int, "subsample each task's training set"),
    "--max-test-per-task": ("max_test_per_task", int, "subsample each task's test set"),
    "--subsample": (
        "subsample",
        str,
        "how --max-*-per-task choose: random (per task, seeded) or first (same for every task)",
    ),
    "--validation-fraction": (
        "validation_fraction",
        float,
        "evaluate on this fraction of TRAIN held out (tuning), not test",
    ),
    "--head": (
        "head",
        str,
        "masked (one shared head, logits outside the task masked; the "
        "reference) or multi (disjoint output units per task)",
    ),
    "--chunk-steps": ("chunk_steps", int, "steps per compiled chunk (progress granularity)"),
    "--scan-unroll": (
        "scan_unroll",
        int,
        "steps unrolled in each compiled chunk (conv nets on CPU run faster unrolled)",
    ),
    "--vector-chunk": (
        "vector_chunk",
        int,
        "consolidation batches per vmapped call (lower it if the consolidation runs out of memory)",
    ),
}


_BENCH_EXTRA = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "orbax": "orbax-checkpoint",
    "PIL": "pillow",
}
"""Top-level modules of the ``bench`` extra's packages -> package names."""


def _default(field: str):
    """The value a flag's field takes when neither the flag nor a --config file sets it."""
    if field in DEMO:
        return DEMO[field]
    f = next(f for f in dataclasses.fields(Config) if f.name == field)
    return None if f.default is dataclasses.MISSING else f.default


def _with_default(hlp: str, field: str) -> str:
    value = _default(field)
    if value is None or "(default" in hlp:
        return hlp
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{hlp} (default {value})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgo-bench",
        description=textwrap.fill(
            "Continual learning with Recursive Gradient Optimization (RGO). Runs the "
            "methods on a task-incremental benchmark (task id known at train and test "
            "time), prints the accuracy matrix R[i, j] (accuracy on task j after training "
            "task i) with ACC, BWT and forgetting, and writes results, plots and checkpoints "
            "to --out. Rerunning the same command on the same --out resumes. Without "
            "--config the default job is a short demo on scikit-learn's bundled digits: the "
            "defaults below are the demo's, a named --benchmark's protocol or a --config "
            "file's values replace them, and flags override both; the run prints which "
            "values it uses and where each came from."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", help="JSON file of Config fields (benchmarks/configs/*.json); flags override it"
    )
    p.add_argument("--out", default="runs/latest", help="run directory (default runs/latest)")
    for flag, (field, _, hlp) in _FLAGS.items():
        p.add_argument(flag, default=None, help=_with_default(hlp, field))
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, repeatable, addressed per method family (every chosen preset "
        "of it that does not fix the value) or per preset (overrides the preset's value, "
        "e.g. rgo-alpha1.alpha=0.5); an option none of the chosen methods has is an error. "
        "Options and defaults: "
        + option_help()
        + ". The flat names of earlier versions remain aliases: "
        + ", ".join(f"{k}={v}" for k, v in OPTION_ALIASES.items() if not v.startswith("rgo.")),
    )
    p.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoints")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every task's checkpoint (default: only the last two per method and seed, "
        "what resuming needs; the one before the last is the fallback if the last is corrupt)",
    )
    p.add_argument(
        "--no-vmap-seeds",
        action="store_true",
        help="run seeds one after another instead of vmapped together",
    )
    p.add_argument(
        "--input-projection",
        action="store_true",
        help="RGO methods and OWM project dense-layer gradients on the input side, (P X^T) D: "
        "the same update, much faster for wide layers and small batches",
    )
    p.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print where the time went (import, data, compilation per function, train, "
        "task boundary, evaluation, checkpoint, report, per task); also OUT/profile.json",
    )
    p.add_argument(
        "--compilation-cache",
        metavar="DIR|off",
        help=f"JAX persistent compilation cache (default ${_profile.CACHE_ENV} or "
        "~/.cache/rgo_jax/jax_compilation_cache; off disables it)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw a progress bar on stderr (default: only when stderr is a terminal)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list the benchmarks (and the data files they need) and the methods, then exit",
    )
    p.add_argument("--version", action="version", version=f"rgo-bench {rgo_jax.__version__}")
    return p


EXIT_CODES = """exit codes:
  0    the run finished (or --help, --version, --list)
  2    an input error, reported in one line naming the problem: a bad flag or config
       value, a data set not found or unreadable, an unusable --out, a diverging run
  1    the harness cannot start (the bench extra is not installed) or an unexpected error
  130  interrupted (Ctrl-C); rerun the same command to resume"""


def _print_list() -> None:
    print("benchmarks:")
    for name, build in sorted(BENCHMARKS.items()):
        datasets = getattr(build, "datasets", ())
        if datasets == ("digits",):
            need = "no files (scikit-learn's bundled digits)"
        elif len(datasets) > 1:
            need = f"needs data files: two or more of {', '.join(datasets)}"
        elif datasets:
            need = f"needs data files: {datasets[0]}"
        else:
            need = ""
        print(f"  {name:24s} {need}".rstrip())
    print("  (data files are read from --data-dir, else $RGO_DATA_DIR, else ~/.cache/rgo_jax)")
    print("methods:")
    for name, m in sorted(METHODS.items()):
        print(f"  {name:12s} {m.description}{'  [uses memory]' if m.uses_memory else ''}")
    print("method options (--option KEY=VALUE):", option_help())


def _missing_extra(err: BaseException) -> str | None:
    """The ``bench`` extra's package whose absence caused ``err`` (else ``None``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ImportError) and err.name:
            package = _BENCH_EXTRA.get(err.name.split(".")[0])
            if package:
                return package
        err = err.__cause__ or err.__context__
    return None


def _convert(value: str, typ, flag: str):
    try:
        if typ == "list":
            return [v for v in value.split(",") if v]
        if typ == "intlist":
            return [int(v) for v in value.split(",") if v]
        return typ(value)
    except ValueError:
        raise SystemExit(f"rgo-bench: {flag} {value!r} is not a valid value.") from None


#: RGO's options, stored as Config fields, and the flags that set them.
_RGO_FIELDS = {
    "rgo.alpha": "--alpha",
    "rgo.consolidation_batches": "--consolidation-batches",
    "rgo.rls_method": "--rls-method",
}


def config_from_args(args: argparse.Namespace) -> Config:
    """Builds the Config: the JSON file (or the demo and a named benchmark's protocol),
    then the flags on top."""
    return config_and_sources(args)[0]


def config_from_argv(argv: list[str]) -> Config:
    """The Config ``rgo-bench ARGV`` would run (e.g. ``["--config", "file.json"]``)."""
    return config_from_args(_parser().parse_args(argv))


#: The Config fields the run's header shows (with any other field set by a flag or file).
_HEADER = (
    "benchmark",
    "dataset",
    "stream",
    "classes_per_task",
    "methods",
    "model",
    "hidden",
    "width",
    "num_tasks",
    "steps_per_task",
    "batch_size",
    "learning_rate",
    "alpha",
    "consolidation_batches",
    "seeds",
)


def protocol_header(cfg: Config, sources: dict[str, str]) -> str:
    """The lines a run prints first: each protocol value and where it came from."""
    by_source: dict[str, list[str]] = {}
    keys = [*_HEADER, *(k for k in sources if k not in _HEADER)]
    for key in keys:
        value = getattr(cfg, key)
        if value is None and key not in sources:
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        by_source.setdefault(sources.get(key, "Config default"), []).append(f"{key}={value}")
    lines = ["protocol:"] + [f"  {src}: {', '.join(items)}" for src, items in by_source.items()]
    return "\n".join(lines)


def _known_options(options: dict, methods) -> dict:
    """The protocol's method options that one of ``methods`` has (the rest do not apply)."""
    kept = {}
    for key, value in options.items():
        try:
            check_method_options({key: value}, tuple(methods))
        except ValueError:
            continue
        kept[key] = value
    return kept


def _derive_num_tasks(fields: dict, sources: dict) -> None:
    """A split of one's own data set without a number of tasks: as many as its classes make."""
    given = sources.get("num_tasks", "").startswith(("flag", "config file"))
    if fields.get("stream") != "split" or given:
        return
    from rgo_jax.bench import data  # noqa: PLC0415

    try:
        ds = data.load_dataset(fields["dataset"], fields.get("data_dir"))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rgo-bench: {err}") from None
    k = fields.get("classes_per_task") or 2
    fields["num_tasks"] = max(1, ds.num_classes // k)
    sources["num_tasks"] = f"derived: {ds.num_classes} classes of {ds.name}, {k} per task"


def config_and_sources(args: argparse.Namespace) -> tuple[Config, dict[str, str]]:
    """:func:`config_from_args` and, for each field set, where its value came from."""
    sources: dict[str, str] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"rgo-bench: config file {path} does not exist.")
        try:
            fields = config_root(json.loads(path.read_text()), path)
        except json.JSONDecodeError as err:
            raise SystemExit(f"rgo-bench: config file {path} is not valid JSON: {err}") from None
        except ValueError as err:
            raise SystemExit(f"rgo-bench: {err}") from None
        fields.pop("_doc", None)
        sources = dict.fromkeys(fields, f"config file {path}")
    else:
        fields = dict(DEMO)
        sources = dict.fromkeys(DEMO, "demo default")
        if args.benchmark in PROTOCOLS and args.dataset is None:
            protocol = PROTOCOLS[args.benchmark]
            fields.update(protocol)
            sources.update(dict.fromkeys(protocol, f"{args.benchmark} protocol"))
            if args.methods is not None and "method_options" in protocol:
                methods = _convert(args.methods, "list", "--methods")
                fields["method_options"] = _known_options(protocol["method_options"], methods)
        elif args.dataset is not None:
            fields.pop("benchmark")
            del sources["benchmark"]
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = set(fields) - known
    if unknown:
        raise SystemExit(
            f"rgo-bench: unknown config fields {sorted(unknown)}; valid: {sorted(known)}."
        )
    try:
        check_fields(fields)
    except ValueError as err:
        where = f"config file {args.config}: " if args.config else ""
        raise SystemExit(f"rgo-bench: {where}{err}") from None
    for flag, (field, typ, _) in _FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            fields[field] = _convert(value, typ, flag)
            sources[field] = f"flag {flag}"
    if fields.get("dataset") is not None and "benchmark" not in sources:
        stem = Path(fields["dataset"]).name.removesuffix(".npz")
        fields["benchmark"] = f"{fields.get('stream')}_{stem}"  # the report's label
        sources["benchmark"] = "label of --dataset"
    if fields.get("dataset") is not None:
        _derive_num_tasks(fields, sources)
    options = dict(fields.get("method_options", {}))
    flagged: set[str] = set()  # the options the flags set, by their addressed name
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"rgo-bench: --option {item!r} must be KEY=VALUE.")
        flag = _RGO_FIELDS.get(OPTION_ALIASES.get(key, key))
        if flag is not None:  # RGO's options are Config fields (their flags' spelling)
            field, typ, _ = _FLAGS[flag]
            given = getattr(args, flag.lstrip("-").replace("-", "_"))
            if given is not None and _convert(given, typ, flag) != _convert(value, typ, key):
                raise SystemExit(f"rgo-bench: --option {item} contradicts {flag} {given}.")
            fields[field] = _convert(value, typ, f"--option {key}")
            sources[field] = f"flag --option {key}"
            continue
        addressed = OPTION_ALIASES.get(key, key)
        if addressed not in flagged:  # a flag overrides the file's value in either spelling
            for k in [k for k in options if OPTION_ALIASES.get(k, k) == addressed]:
                del options[k]
        flagged.add(addressed)
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value  # a string option (e.g. ewc_fisher=sampled)
    fields["method_options"] = options
    if args.no_checkpoint:
        fields["checkpoint"] = False
    if args.no_vmap_seeds:
        fields["vmap_seeds"] = False
    if args.input_projection:
        fields["input_projection"] = True
    if args.no_plots:
        fields["plots"] = False
    if args.keep_checkpoints:
        fields["keep_checkpoints"] = True
    for k in ("methods", "seeds", "hidden"):
        if k in fields:
            fields[k] = tuple(fields[k])
    try:
        return Config(**fields), sources
    except (ValueError, TypeError) as err:
        raise SystemExit(f"rgo-bench: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        _print_list()
        return 0
    try:
        cfg, sources = config_and_sources(args)
    except SystemExit as err:  # an input error: one line, and exit code 2 as argparse's
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            err.code = 2  # the status; str(err) stays the message
        raise
    print(protocol_header(cfg, sources))
    _profile.enable_compilation_cache(_profile.compilation_cache_dir(args.compilation_cache))
    if args.profile:
        _profile.start()
    try:
        run(cfg, args.out, progress=args.progress)
    except (FileNotFoundError, RunError) as err:
        end_progress_bars()
        print(f"rgo-bench: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_progress_bars()
        print(interrupted_message(args.out, cfg.checkpoint), file=sys.stderr)
        return 130
    except ImportError as err:
        package = _missing_extra(err)
        if package is None:
            raise
        print(
            f"rgo-bench: {package} is not installed; the benchmark harness needs the bench "
            "extra: pip install 'rgo_jax[bench]'",
            file=sys.stderr,
        )
        return 1
    if args.profile:
        print(_profile.finish(args.out))
    print(f"\nResults in {args.out}/ (summary.md, results.json, *.png, checkpoints/)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
