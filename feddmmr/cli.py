"""Command line: ``feddmmr <command> --help`` explains each step.

Every command reads its section of ``params.yaml`` (embedded defaults when the file is absent) and
accepts ``-S section.key=value`` overrides, the same syntax as ``dvc exp run -S``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from feddmmr import interrupts
from feddmmr.errors import FeddmmrError, redact
from feddmmr.modalities import NAMES

DESCRIPTION = """FedDMMR: federated multimodal sequential recommendation, as a reproducible pipeline.

Commands (prepare, features, train and baseline are also the DVC stages of dvc.yaml):
  prepare   ingest MovieLens-1M / MovieLens-100K / a CSV, subset users, leave-one-out split
  features  item features of a modality: `features <modality>` ({modalities})
  train     federated training of a stage: pretrain_sasrec -> align_projectors -> finetune_moe
  evaluate  evaluate a stage checkpoint (full ranking and 1+100 sampled negatives)
  baseline  a reference evaluated the same way: popularity, or the centralized counterpart
  compare   the stages' metrics side by side, with paired tests per user, from MLflow
  promote   make a registered model version the champion, on purpose, with the reason recorded
  sweep     the pipeline over several seeds (DVC experiments): intervals and paired tests
  ablate    stage 3 retrained without each of its parts (DVC experiments): the ablation table
  recommend top-k items for a user, a file of users or a new user's history
  make-demo write the small synthetic dataset used as the embedded default
""".format(modalities=", ".join(NAMES))


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml",
                   help="parameters file (default: params.yaml; embedded defaults when it does not exist)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter, e.g. -S pretrain_sasrec.rounds=5 (repeatable)")


def _add_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="full", choices=["full", "sampled"], help="evaluation protocol (default: full)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddmmr", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-round log lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _prepare_parser(sub)
    _features_parser(sub)
    _train_parser(sub)
    _evaluate_parser(sub)
    _baseline_parser(sub)
    _compare_parser(sub)
    _promote_parser(sub)
    _sweep_parser(sub)
    _ablate_parser(sub)
    _recommend_parser(sub)
    _make_demo_parser(sub)
    return parser


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="ingest and split interaction data",
                       description="Read the interaction data named by the `prepare` params section (source: ml-1m | "
                                   "ml-100k | csv; path: folder, zip or file), keep the top-K most active users, map "
                                   "ids to contiguous indices, order each user's items by time (ties by file order), "
                                   "draw the fixed evaluation negatives and write everything atomically to --out.")
    _add_params(p)
    p.add_argument("--out", default="data/prepared", help="output directory (default: data/prepared)")


def _features_parser(sub) -> None:
    p = sub.add_parser("features", help=f"extract the item features of a modality ({', '.join(NAMES)})",
                       description="Embed every prepared item with the modality's extractor (its params: the "
                                   f"features_<modality> section; the modalities: {', '.join(NAMES)}, as "
                                   "feddmmr/modalities.py registers them). Writes features.safetensors (rows indexed "
                                   "by prepared item id, row 0 padding, L2-normalised, masked zero rows for missing "
                                   "items) and report.json (coverage, model, dims, source hashes).")
    p.add_argument("modality", choices=NAMES, help="which feature to extract (its params: features_<modality>)")
    _add_params(p)
    p.add_argument("--data", default="data/prepared", help="prepared data directory (default: data/prepared)")
    p.add_argument("--out", help="output directory (default: features/<modality>)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="federated training of one stage",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""Train a stage federatedly on prepared data: each user is a client, a client_fraction
of clients trains per round, FedAvg (+ server optimizer) aggregates. Validation each round, early
stopping, best checkpoint kept; test metrics of the best round go to --metrics.

Every round is saved beside the output (.<out>.resume/): a stage that was killed, or whose MLflow
server went away, resumes from its last completed round when the same command runs again. A
non-finite loss, weight or score stops the stage (exit 3); the checkpoint then holds the best finite
round, marked diverged. A second training into an output in use refuses at once.

Exit status: 0 done; 2 bad input or parameters; 3 training diverged; 4 trained and written, but
MLflow did not record everything (run the command again once it answers); 5 the machine failed the
run (a worker killed or out of memory, the disk full: run it again, it resumes); 130 interrupted.

Stages (each reads its own params.yaml section):
  pretrain_sasrec   SASRec over item ids; everything trains.
  align_projectors  loads item embeddings + backbone from pretrain_sasrec; only the modalities'
                    projections and the residual gate train (alignment to the frozen item space).
  finetune_moe      loads every group from align_projectors (or item embeddings + backbone from
                    pretrain_sasrec when finetune_moe.init_from is pretrain_sasrec: the 2-stage path);
                    everything but the item embeddings trains.
Stages 2-3 need the feature files (`feddmmr features <modality>`: {modalities}) and keep a memory per
client.""".format(modalities=", ".join(NAMES)))
    _add_params(p)
    p.add_argument("--stage", default="pretrain_sasrec", choices=["pretrain_sasrec", "align_projectors", "finetune_moe"],
                   help="stage to train (default: pretrain_sasrec)")
    p.add_argument("--data", default="data/prepared", help="prepared data directory (default: data/prepared)")
    p.add_argument("--features", default="features",
                   help=f"folder with a <modality>/ feature output each ({', '.join(NAMES)}), stages 2-3 "
                        "(default: features)")
    p.add_argument("--init", help="checkpoint to start from (default: checkpoints/<init_from> beside --out)")
    p.add_argument("--out", help="checkpoint directory (default: checkpoints/<stage>)")
    p.add_argument("--metrics", help="metrics JSON file (default: metrics/<stage>.json); the few that dvc exp show "
                                     "lists go beside it (<stage>.summary.json)")
    p.add_argument("--engine", choices=["simulation", "flower"],
                   help="where the clients train (default: federation.engine in params.yaml, simulation): simulation "
                        "= on this machine; flower = on a Flower federation, the SuperLink at federation.superlink or "
                        "one started on 127.0.0.1 with federation.nodes SuperNodes (needs the flower extra); in "
                        "stages 2-3 the SuperNodes keep the client memories, so a stage trained there continues only "
                        "on that federation")
    p.add_argument("--restart", action="store_true",
                   help="discard the saved state of an interrupted run of this stage and start from round 0 "
                        "(by default a killed stage resumes from its last completed round)")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a stage checkpoint",
                       description="Load a checkpoint directory (model.safetensors + config.json, and for "
                                   "stages 2-3 memory.safetensors plus the feature files) and print HR/NDCG@k and MRR "
                                   "for both protocols as JSON.")
    _add_params(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, e.g. checkpoints/pretrain_sasrec")
    p.add_argument("--data", default="data/prepared", help="prepared data directory (default: data/prepared)")
    p.add_argument("--features", default="features",
                   help="feature folder of a multimodal checkpoint (default: features)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="split to evaluate (default: test)")


def _baseline_parser(sub) -> None:
    p = sub.add_parser("baseline", help="a reference recommender: popularity, or the centralized counterpart",
                       description="Evaluate a baseline exactly as the stages are evaluated (both protocols, the same "
                                   "negatives) and write its metrics, per-user test ranks and MLflow run, so that "
                                   "`feddmmr compare` shows it beside the stages. popularity: items ranked by their "
                                   "number of training interactions; centralized: the stage-1 model trained on the same windows without "
                                   "federation (params section `centralized`; every epoch saved for resume).")
    _add_params(p)
    p.add_argument("name", choices=["popularity", "centralized"], help="the baseline")
    p.add_argument("--data", default="data/prepared", help="prepared data directory (default: data/prepared)")
    p.add_argument("--out", help="output directory (default: checkpoints/<name>)")
    p.add_argument("--metrics", help="metrics file (default: metrics/<name>.json); the few that dvc exp show lists "
                                     "go beside it (<name>.summary.json)")


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="stage metrics side by side (MLflow)",
                       description="Print the best-validation and test metrics of every stage of a pipeline run, "
                                   "read from the MLflow store (MLFLOW_TRACKING_URI, default sqlite:///mlruns.db).")
    p.add_argument("--run", "--pipeline", dest="pipeline",
                   help="pipeline run: its name in the MLflow UI (pipeline-<key> or a flow run's DVC experiment), "
                        "its run id, or the tag feddmmr.pipeline_key (default: the latest pipeline run)")
    _add_protocol(p)


def _promote_parser(sub) -> None:
    p = sub.add_parser("promote", help="make a registered model version the champion",
                       description="Point the alias champion of the registered model feddmmr at VERSION and record "
                                   "why on the version (tag champion_reason). Training moves the champion by itself "
                                   "only to a pipeline run's best stage that beats the current champion on the same "
                                   "prepared data; candidates (parameter overrides, another output, sweeps and "
                                   "experiments) and models trained on other data are promoted with this command. "
                                   "Store: MLFLOW_TRACKING_URI (default sqlite:///mlruns.db).")
    p.add_argument("version", help="the version of the registered model feddmmr (the MLflow UI's Models page)")
    p.add_argument("--reason", default="promoted by hand (feddmmr promote)", help="recorded on the version")


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="the pipeline over several seeds: mean, 95%% interval, paired tests",
                       description="Run the pipeline once per seed as a DVC experiment (dvc exp run --temp, named "
                                   "seeds-<seed>-<tag>, each also an MLflow pipeline run) with every training "
                                   "stage's seed set, then print each stage's test metrics as mean and 95% "
                                   "Student-t interval over the seeds, and per seed the paired test of each stage "
                                   "against pretrain_sasrec. Seeds already finished for the same commit, "
                                   "params.yaml and overrides are not run again. Run it in the project folder.")
    _add_params(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds (default: 42 43 44)")
    _add_protocol(p)


def _ablate_parser(sub) -> None:
    p = sub.add_parser("ablate", help="retrain stage 3 without each of its parts: the ablation table",
                       description="Retrain finetune_moe once per ablation as a DVC experiment (dvc exp run --temp "
                                   "--force --single-item finetune_moe, named ablation-<name>-<tag>, each also an "
                                   "MLflow pipeline run), then print each one's test metrics and its paired test "
                                   "against the full model. Run it in the project folder after `dvc repro`, with "
                                   "dvc.lock tracked by git (the experiments start from the earlier stages' outputs "
                                   "in the DVC cache). Ablations finished for the same "
                                   "commit, params.yaml and overrides are not run again.")
    names = p.add_argument("ablations", nargs="*", metavar="ABLATION",
                           help="the ablations to run (default: all; full, the reference, always runs)")
    _add_params(p)
    _add_protocol(p)

    def format_help() -> str:
        # the ablations are listed from the experiments layer only when this help is shown: building the parser
        # must not import it, or every command (and every DVC stage's code) would depend on it
        from feddmmr.experiments.sweeps import ABLATIONS
        listing = "; ".join(f"{a}: {' '.join(c) or 'no change'}" for a, c in ABLATIONS.items())
        p.description = p.description.rstrip(".") + f". The ablations: {listing}."
        names.help = (f"the ablations to run, of {', '.join(ABLATIONS)} (default: all; full, the reference, "
                      "always runs)")
        return argparse.ArgumentParser.format_help(p)
    p.format_help = format_help


def _recommend_parser(sub) -> None:
    p = sub.add_parser("recommend", help="top-k items for users or a new user's history",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""Recommend the top-k items from a stage's model, by original user and item ids.

A known user is scored from their whole history (and, for stages 2-3, their client memory); a new
user is given as an item history, oldest first, and starts with an empty memory. Items the user
already interacted with are excluded unless --include-known. Each row: original item id, title
(where the dataset has item metadata), score.

The model comes from a checkpoint (with its prepared data and, for stages 2-3, features) or from
the MLflow model registry (--model models:/feddmmr@champion, store: MLFLOW_TRACKING_URI).

Examples:
  feddmmr recommend --user 10
  feddmmr recommend --history 1193,661,914 -k 5 --checkpoint checkpoints/pretrain_sasrec
  feddmmr recommend --users users.txt --out recs.csv --model models:/feddmmr@champion""")
    _add_params(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="original id of a user of the prepared data")
    who.add_argument("--users", metavar="FILE", help="users file: JSON list, or one user id per line")
    who.add_argument("--history", metavar="ITEMS", help="a new user's original item ids, oldest first: 1193,661,914")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="stage checkpoint directory (default: checkpoints/finetune_moe)")
    src.add_argument("--model", metavar="URI", help="an MLflow model instead, e.g. models:/feddmmr@champion")
    p.add_argument("--data", default="data/prepared", help="prepared data of the checkpoint (default: data/prepared)")
    p.add_argument("--features", default="features", help="feature folder of a stage 2-3 checkpoint (default: features)")
    p.add_argument("-k", type=int, default=10, help="items per user (default: 10)")
    p.add_argument("--include-known", action="store_true", help="let items the user already has be recommended")
    p.add_argument("--out", metavar="FILE", help="write CSV, or JSON when FILE ends in .json (default: print)")


def _make_demo_parser(sub) -> None:
    p = sub.add_parser("make-demo", help="write the synthetic demo dataset",
                       description="Write the deterministic synthetic interaction CSV used as the embedded default.")
    p.add_argument("--out", default="data/demo/interactions.csv", help="output CSV (default: data/demo/interactions.csv)")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--seed", type=int, default=7)


def run(args: argparse.Namespace) -> int:
    from feddmmr.config import load_params

    if args.command == "make-demo":
        from feddmmr.data.demo import write_demo
        frame = write_demo(args.out, num_users=args.users, num_items=args.items, seed=args.seed)
        print(f"wrote {args.out}: {len(frame)} interactions, {frame.user.nunique()} users, {frame.item.nunique()} items")
        return 0
    if args.command == "recommend":
        return _recommend(args)
    if args.command == "compare":
        from feddmmr.tracking.reports import compare
        print(compare(args.pipeline, args.protocol))
        return 0
    if args.command == "promote":
        from feddmmr.tracking.registry import promote_version
        print(promote_version(args.version, args.reason))
        return 0
    params = load_params(args.params, args.overrides)      # bad overrides fail here, in one line
    if args.command in ("ablate", "sweep"):
        if not params.tracking.enabled:
            raise FeddmmrError(f"feddmmr {args.command} summarises the MLflow runs of its experiments, and "
                               "tracking.enabled is false: set it to true in params.yaml (or -S tracking.enabled=true)")
        return _experiments(args)
    if args.command == "prepare":
        from feddmmr.data.prepare import prepare
        meta = prepare(params.prepare, args.out)
        print(f"prepared {args.out}: {meta['num_users']} users, {meta['num_items']} items, "
              f"{meta['num_interactions']} interactions")
        return 0
    if args.command == "features":
        from feddmmr.features.extract import extract
        out = args.out or f"features/{args.modality}"
        report = extract(args.modality, params, args.data, out, progress=_progress(args))
        print(f"wrote {out}: {report['covered']}/{report['items']} items ({report['coverage_pct']:.1f}%), "
              f"{report['dim']}-d, {report['seconds']:.1f}s")
        return 0
    if args.command == "train":
        return _train(args, params)
    if args.command == "baseline":
        out, metrics_path = args.out or f"checkpoints/{args.name}", args.metrics or f"metrics/{args.name}.json"
        if args.name == "centralized":
            from feddmmr.training.centralized import train_centralized
            metrics = train_centralized(params, args.data, out, metrics_path, progress=_progress(args))
        else:
            from feddmmr.training.baselines import run_baseline
            metrics = run_baseline(args.name, params, args.data, out, metrics_path, progress=_progress(args))
        _print_json({k: metrics[k] for k in ("stage", "test")})
        return 0
    if args.command == "evaluate":
        from feddmmr.data.prepare import load_prepared
        from feddmmr.evaluation.metrics import Evaluator
        from feddmmr.training.checkpoint import load_checkpoint
        data = load_prepared(args.data)
        model, config, memory = load_checkpoint(args.checkpoint, data, args.features, diverged_ok=True)
        result = Evaluator(data, params.evaluation.ks, params.evaluation.batch_size).evaluate(model, args.split, memory)
        _print_json({"checkpoint": str(args.checkpoint), "stage": config["stage"], "split": args.split, **result})
        return 0
    raise AssertionError(args.command)


def _train(args: argparse.Namespace, params) -> int:
    """One stage on this machine (the simulator) or on a Flower federation (``--engine flower``). With parameter
    overrides or an output of its own, the stage's model is a candidate: it never moves the champion by itself."""
    own_out = args.out and Path(args.out) != Path(f"checkpoints/{args.stage}")
    if args.overrides or args.params != "params.yaml" or own_out:
        os.environ["FEDDMMR_CANDIDATE"] = "1"
    from feddmmr.training.stages import train_stage
    out = args.out or f"checkpoints/{args.stage}"
    metrics_path = args.metrics or f"metrics/{args.stage}.json"
    if (args.engine or params.federation.engine) == "flower":
        try:
            from feddmmr.flower.launcher import train_on_flower
        except ModuleNotFoundError as exc:
            missing = (exc.name or "flwr").split(".")[0]
            raise FeddmmrError(f"--engine flower needs Flower ({missing} is not installed): "
                               "pip install -e '.[flower]'") from None
        metrics = train_on_flower(args.stage, params, args.params, args.overrides, args.data, out, metrics_path,
                                  args.features, args.init, args.restart)
    else:
        metrics = train_stage(args.stage, params, args.data, out, metrics_path, progress=_progress(args),
                              features_dir=args.features, init_dir=args.init, restart=args.restart)
    _print_json({k: metrics[k] for k in ("stage", "best_round", "seconds_per_round", "test")})
    return 0


def _experiments(args: argparse.Namespace) -> int:
    """Sets of DVC experiments in the project folder: the ablations of stage 3, or the pipeline over seeds."""
    from feddmmr.experiments import sweeps
    if args.command == "ablate":
        print(sweeps.summarize_ablations(sweeps.run_ablations(".", args.overrides, only=args.ablations),
                                         args.protocol))
    else:
        names = sweeps.run_seeds(".", args.seeds, args.overrides)
        print(sweeps.summarize(names, args.seeds, args.protocol))
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from feddmmr.serving.recommend import (
        format_table,
        parse_history,
        read_users,
        write_recommendations,
    )
    users = [args.user] if args.user is not None else read_users(args.users) if args.users else None
    history = parse_history(args.history) if args.history is not None else None
    recommend, source = _recommender(args)
    frame = recommend(users, history, args.k, args.include_known)
    if args.out:
        write_recommendations(frame, args.out)
        print(f"wrote {args.out}: {frame['request'].nunique()} users, {len(frame)} recommendations ({source})")
    elif args.users:
        print(frame.to_csv(index=False), end="")
    else:
        who = f"user {args.user}" if args.user is not None else "a new user"
        print(f"top {args.k} for {who} ({source}; known items {'included' if args.include_known else 'excluded'})")
        print(format_table(frame))
    return 0


def _recommender(args: argparse.Namespace):
    """recommend(users, history, k, include_known) -> frame, from a checkpoint or an MLflow model; its source."""
    if args.model:
        from feddmmr.serving.pyfunc import LoadedModel
        return LoadedModel(args.model).recommend, f"MLflow model {args.model}"
    from feddmmr.config import load_params
    from feddmmr.data.items import item_titles
    from feddmmr.serving.recommend import Recommender
    params = load_params(args.params, args.overrides)
    checkpoint = args.checkpoint or "checkpoints/finetune_moe"
    rec = Recommender.load(checkpoint, args.data, args.features, item_titles(params.prepare, params.features_text.movies))
    return (lambda users, history, k, known: rec.for_users(users, k, known) if users is not None
            else rec.for_histories([history], k, known)), f"{rec.stage} checkpoint {checkpoint}"


def _print_json(obj: dict) -> None:
    """Indented for a person at a terminal; one line for a log, a pipe or the Prefect UI (one record, not 30)."""
    print(json.dumps(obj, indent=2 if sys.stdout.isatty() else None))


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: a log file, a pipe or the Prefect UI gets one line per round instead."""
    return not args.quiet and sys.stderr.isatty()


class _Redact(logging.Filter):
    """Masks the password of any URL in a log record (an MLflow URI with credentials)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:   # no secret in any log line, ours or a library's
        handler.addFilter(_Redact())
    interrupts.install()   # SIGTERM (docker stop, a Prefect cancellation) ends the run like Ctrl-C
    try:
        return run(args)
    except FeddmmrError as exc:
        print(f"feddmmr: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:       # disk full, permissions, an output path below a file: one line, never a traceback
        from feddmmr.io import os_error_line
        line, status = os_error_line(exc)
        print(f"feddmmr: error: {line}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        resumable = " (a training stage resumes from its last completed round when run again)" \
            if args.command == "train" else ""
        print(f"feddmmr: interrupted; nothing partial was written{resumable}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
