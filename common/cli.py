"""python -m common COMMAND: the same runs as the notebooks, without Jupyter, and what surrounds
them (list, train, predict, charts, report, bench, study, notebooks).

Bad input ends with one line on stderr and a non-zero status, never a traceback.
"""
import argparse
import json
import sys

from .config import COMPILE_WAYS, UserError, parse_settings
from .experiments import EXPERIMENTS, SEED_STUDY, get_experiment, twins


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least_one(text):
    """An argparse type: an int of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_list(args):
    from .history import experiment_state
    from .models import count_parameters, model_from_config, model_options
    print(f"{'experiment':32} {'architecture':12} {'activation':10} {'optimizer':9} "
          f"{'epochs':>6} {'trainable params':>16}  run in its folder")
    for name, exp in EXPERIMENTS.items():
        c = exp.config
        activation = model_options(c)["activation"]
        state, same = experiment_state(exp.folder), twins(name)
        if state == "-" and same:  # the tables show the twin's run for it
            state += f" (same settings as {', '.join(same)})"
        print(f"{name:32} {c.architecture:12} {activation:10} {c.optimizer:9} {c.epochs:>6} "
              f"{count_parameters(model_from_config(c)):>16,}  {state}")


def cmd_train(args):
    from .training import train
    config = get_experiment(args.experiment).config
    overrides = parse_settings(config, args.set)
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "data_dir": args.data_dir,
             "subset": args.subset, "device": args.device, "seed": args.seed}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.no_download:
        overrides["download"] = False
    if args.val is not None:
        overrides["val"] = args.val
    if args.seeds is not None:
        from .training import train_seeds
        train_seeds(args.experiment, args.seeds, first_seed=overrides.pop("seed", 0), out_dir=args.out,
                    overwrite=args.overwrite, resume=args.resume, **overrides)
    else:
        train(args.experiment, out_dir=args.out, overwrite=args.overwrite, resume=args.resume, **overrides)


def cmd_predict(args):
    from .predict import predict
    result = predict(args.run_dirs, args.images, out=args.out, probs=args.probs, tta=args.tta,
                     device=args.device)
    print(result.summary())
    print(f"wrote {args.out}" + (f" and {args.probs}" if args.probs else ""))


def cmd_charts(args):
    from .charts import make_charts
    for path in make_charts(args.training_dir, args.top_dir, args.results_dir, args.readme):
        print(f"wrote {path}")


def cmd_report(args):
    from .report import build_report
    for path in build_report(args.training_dir, args.top_dir, args.results_dir, args.readme):
        print(f"wrote {path}")


def cmd_bench(args):
    from .bench import MODES, bench, record, table
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise UserError(f"unknown bench mode {', '.join(unknown)}; choose from {', '.join(MODES)}")
    config = get_experiment(args.experiment).config
    settings = parse_settings(config, args.set)
    result = bench(args.experiment, args.device, args.batch_size, args.data_dir, args.steps,
                   args.repeats, modes, download=False if args.no_download else None, settings=settings)
    print(table(result))
    if args.json:
        from .history import write_atomic
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if args.record:
        print(f"wrote {record(result, 'python -m common ' + ' '.join(sys.argv[1:]))}")


def cmd_study(args):
    from .data import ensure_cifar10
    from .study import finished, study
    from .training import check_settings
    from .devices import resolve_device
    chosen_elsewhere = sorted({text.partition("=")[0] for text in args.set} & {"compile", "compile_mode"})
    if chosen_elsewhere:
        raise UserError(f"a study compiles with --compile (auto, eager, compile or cuda-graphs), not "
                        f"--set {chosen_elsewhere[0]}")
    names = list(EXPERIMENTS) if args.all else SEED_STUDY if args.seed_study else args.names
    if not names:
        raise UserError("name experiments, or pass --seed-study or --all")
    names = list(dict.fromkeys(names))  # one process per folder: a name given twice runs once
    devices = args.devices.split(",")
    for device in devices:  # a bad device fails here, not once per run
        resolve_device(device)
    flags = {"epochs": args.epochs, "subset": args.subset, "batch_size": args.batch_size,
             "data_dir": args.data_dir}
    configs = {}
    for name in names:  # settings are checked against every experiment before any process starts
        config = get_experiment(name).config
        configs[name] = config.replace(**{**parse_settings(config, args.set),
                                          **{k: v for k, v in flags.items() if v is not None}})
        check_settings(configs[name])
    # Once here, not by every run at once: parallel downloads into one folder would collide.
    ensure_cifar10(args.data_dir, allow_download=not args.no_download)
    extra = [str(v) for key, value in flags.items() if value is not None
             for v in (f"--{key.replace('_', '-')}", value)]
    extra += ["--no-download"] * args.no_download + [v for text in args.set for v in ("--set", text)]
    outcomes = study(configs, parallel=args.parallel, devices=devices, extra_args=extra,
                     out_root=args.out_root, compile_choice=args.compile)
    unfinished = [name for name, outcome in outcomes.items() if not finished(outcome)]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {len(names)} experiment(s) did not complete: "
                        f"{', '.join(unfinished)} (each one's outcome is above)")


def cmd_notebooks(args):
    from .notebooks import write_notebooks
    stale = write_notebooks(check=args.check)
    for path in stale:
        print(f"{'differs from the registry' if args.check else 'wrote'}: {path}")
    if args.check and stale:
        raise UserError(f"{len(stale)} notebook(s) differ; run `python -m common notebooks`")


def build_parser():
    from .charts import README, RESULTS_DIR
    from .experiments import REPO_ROOT, TRAINING_DIR
    parser = Parser(prog="python -m common", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    commands.add_parser("list", help="every experiment with its trainable-parameter count")

    p = commands.add_parser("train", help="train one experiment, writing history files and run.json")
    p.add_argument("experiment", help="a name from `python -m common list`")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: <repo>/data)")
    p.add_argument("--out", help="run folder (default: the experiment's folder under training/)")
    p.add_argument("--subset", type=int, help="train on N stratified images: a smoke run")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", type=int, metavar="K",
                   help="run seeds SEED..SEED+K-1 into seed<N>/ subfolders and summarise them")
    p.add_argument("--val", type=int, metavar="N",
                   help="hold out N training images to evaluate each epoch; test once at the end")
    p.add_argument("--no-download", action="store_true", help="never download; fail if data is missing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other Config field, e.g. --set lr=0.05 --set optimizer=adam")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder whose unfinished run has a checkpoint, or replace a "
                        "full-budget run's files with another run's (a smoke run, other settings)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (or the experiment's folder) from its checkpoint")

    p = commands.add_parser("predict", help="classify an image set with trained runs, into a CSV")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (several: an ensemble)")
    p.add_argument("--images", required=True,
                   help="a CIFAR-style pickle (b'data', optional b'ids'), a batch file, or an image folder")
    p.add_argument("--out", required=True, help="CSV of ID,Labels rows")
    p.add_argument("--probs", help="also write a CSV of class probabilities")
    p.add_argument("--tta", action="store_true", help="average over flipped and shifted views")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")

    p = commands.add_parser("charts", help="redraw the charts from the history files that exist")
    p.add_argument("--training-dir", default=TRAINING_DIR)
    p.add_argument("--top-dir", default=REPO_ROOT, help="where model_acc/loss/summary.png go")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--readme", default=README, help="README whose results block to rewrite")

    p = commands.add_parser("report", help="summary table, charts and Project Report.pdf from the runs")
    p.add_argument("--training-dir", default=TRAINING_DIR)
    p.add_argument("--top-dir", default=REPO_ROOT, help="where Project Report.pdf and the top charts go")
    p.add_argument("--results-dir", default=RESULTS_DIR, help="where summary.csv/.md and the other charts go")
    p.add_argument("--readme", default=README, help="README whose results block to rewrite")

    p = commands.add_parser("bench", help="training speed against the model's limit and the seed's pipeline")
    p.add_argument("--experiment", default="res_512_d", help="a name from `python -m common list`")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, help="default: the experiment's")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: <repo>/data)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if data is missing")
    p.add_argument("--steps", type=at_least_one, default=20, help="training steps per timed repeat")
    p.add_argument("--repeats", type=at_least_one, default=3, help="timed repeats; the median is reported")
    p.add_argument("--modes", default=",".join(("limit", "ours", "seed-style")),
                   help="comma-separated, any of the default's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any Config field, e.g. --set compile=true --set compile_mode=reduce-overhead")
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--record", action="store_true", help="keep it in results/bench/ and results/bench.md")

    p = commands.add_parser("study", help="run many experiments to completion, several at a time")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--seed-study", action="store_true", help="the original study's fourteen experiments")
    p.add_argument("--all", action="store_true", help="every registered experiment")
    p.add_argument("--parallel", type=at_least_one, default=1, help="processes at once on each device")
    p.add_argument("--devices", default="auto", help="comma-separated, e.g. cuda:0,cuda:1")
    p.add_argument("--out-root", help="run folders go to OUT_ROOT/<experiment> (default: training/)")
    p.add_argument("--compile", choices=("auto", *COMPILE_WAYS), default="auto",
                   help="how the runs execute their models: eager, torch.compile, or torch.compile with "
                        "CUDA graphs; auto (default): on a GPU the fastest, measured for each architecture "
                        "and batch size of the study, compile times included; eager on a CPU")
    p.add_argument("--epochs", type=int, help="for every run (default: each experiment's)")
    p.add_argument("--subset", type=int, help="N stratified training images for every run: a smoke study")
    p.add_argument("--batch-size", type=int, help="for every run (default: each experiment's)")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: <repo>/data)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if data is missing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Config field for every experiment, e.g. --set lr=0.05")

    p = commands.add_parser("notebooks", help="rewrite the experiments' notebooks from the registry")
    p.add_argument("--check", action="store_true", help="only report notebooks that differ")
    return parser


COMMANDS = {"list": cmd_list, "train": cmd_train, "predict": cmd_predict, "charts": cmd_charts,
            "report": cmd_report, "bench": cmd_bench, "study": cmd_study, "notebooks": cmd_notebooks}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # a run saves its checkpoint itself; this is what is left before or after it
        print("\ninterrupted" + (": the run folder keeps every finished epoch" if args.command == "train" else ""),
              file=sys.stderr)
        return 130
    return 0
