"""Leave signers out: how well a model reads a person it never saw, without touching a test set.

    python leave_one_out.py --data everyone --data_dir ../shared/asl --out_dir reports/loso --groups 5
    python leave_one_out.py --xtrain_path ../shared/asl/train ../shared/asl/signers/* --out_dir reports/loso --groups 5
    python leave_one_out.py --data everyone --out_dir reports/loso-hands --hands_only    # seconds per fold
    python leave_one_out.py --data everyone --out_dir reports/loso --folds mariia omega --total_epochs 4

Each training folder holds one signer (or one group of signers). For each folder (or those named by --folds) a
model is trained on all the other folders, with pt_train.py's options (any of them may follow this command's
own), and scored on the folder left out with evaluate.py: a person the model never saw. With many folders that is
many trainings: `--groups N` deals the folders into N groups (the same deal for the same folders and --seed) and
leaves out one group a fold, so N models are trained and each folder is still scored by one that never saw it.
The table (OUT_DIR/table.md and table.json) has one row per folder left out, and the mean over folders; each fold
keeps its run (OUT_DIR/FOLD/run, FOLD the folder's name, or group-K with --groups) and each folder its evaluation
report (OUT_DIR/NAME/report). Choose designs by this table: a test set stays honest only while nothing is chosen
by it.

`--hands_only` trains the landmark network alone on the other folders' hands and scores it on the hands found
in the folder left out: a cheap first look at a design of the landmark network or of the data mix.

A killed run continues where it stopped: folds already scored are kept, and a fold's training resumes from its
last checkpoint. Exit code 2 means a problem with the input, explained in one line.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

import calibration
import data_loader
import data_sources
import evaluate
import hands
import image_io
import predict
import pt_train
import run_artifacts
from errors import UsageError

log = logging.getLogger("leave_one_out")

EXIT_USAGE = 2
ROW_FILE = "row.json"  # a folder's figures, in OUT_DIR/NAME: written once it is scored, so it marks it as done
DEAL_FILE = "folds.json"  # which folders each fold left out
# A left-out folder is scored on at most this many photos a letter, drawn evenly: the Kaggle signer's 300 frames a
# letter would cost more to score than a fold's training, and say no more about a new person than 50 do
SCORE_PER_CLASS = 50


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This command's own options, and the rest: pt_train.py's."""
    # no abbreviations: pt_train's --hands would be read as this command's --hands_only
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", nargs="+", metavar="NAME",
                   help="the training folders by name (data_sources.py list: a set such as everyone, or folders), "
                        "downloaded where --data_dir lacks them")
    p.add_argument("--data_dir", metavar="DIR", help="where --data's folders are, or go (see data_sources.py)")
    p.add_argument("--xtrain_path", nargs="+",
                   help="the training folders (or Kaggle datasets, OWNER/DATASET), each one signer or one group, "
                        "after --data's")
    p.add_argument("--out_dir", default="reports/leave_one_out", help="runs, reports and the table go here")
    p.add_argument("--folds", nargs="+", metavar="NAME",
                   help="leave out only these folders (by name, as in the table; with --groups, their groups); "
                        "default: each in turn")
    p.add_argument("--groups", type=int, metavar="N",
                   help="deal the folders into N groups, dealt by pt_train's --seed, and leave out one group a fold: "
                        "N trainings instead of one per folder, still a row per folder")
    p.add_argument("--score_per_class", type=int, default=SCORE_PER_CLASS, metavar="N",
                   help="score each folder left out on at most N photos a letter (a seeded sample); 0: all")
    p.add_argument("--calibrate_on", nargs="+", metavar="NAME", default=[],
                   help="calibrate each fold's model on the first of these folders that is not the one left out, "
                        "and train it on the others (pt_train.py --calibration_path): the recipe that holds one "
                        "person out for calibration, measured")
    p.add_argument("--hands_only", action="store_true",
                   help="train and score the landmark network alone (the hand search's cache makes it quick)")
    return p.parse_known_args(argv)


def check_names(names: list[str], option: str, given: list[str] | None) -> None:
    """A UsageError naming the choices where `given` (folder names passed with `option`) are not all `names`."""
    unknown = sorted(set(given or ()) - set(names))
    if unknown:
        raise UsageError(f"{option} {' '.join(unknown)}: not among the training folders ({', '.join(names)}).")


def deal(names: list[str], groups: int, seed: int) -> list[list[str]]:
    """The folders dealt into `groups` groups of about the same number of folders: shuffled by `seed`, then dealt
    in turn, so the same folders and seed always give the same groups. Each group is in the folders' order."""
    order = list(names)
    random.Random(seed).shuffle(order)
    return [[name for name in names if name in order[k::groups]] for k in range(groups)]


def folds_of(names: list[str], groups: int | None, seed: int) -> dict[str, list[str]]:
    """Each fold's name and the folders it leaves out: one fold per folder, or one per group with --groups."""
    if not groups:
        return {name: [name] for name in names}
    return {f"group-{k + 1}": members for k, members in enumerate(deal(names, groups, seed))}


def check_deal(out_dir: Path, folds: dict[str, list[str]]) -> None:
    """OUT_DIR keeps the folds it was started with: rows of folds trained on other folders must not be mixed into
    one table."""
    path = out_dir / DEAL_FILE
    if path.is_file() and run_artifacts.load_json(path) != folds:
        raise UsageError(f"{out_dir} holds folds dealt otherwise ({path}): give the same folders, --groups and "
                         "--seed to continue it, or another --out_dir.")
    out_dir.mkdir(parents=True, exist_ok=True)
    run_artifacts.save_json(folds, path)


def fold_argv(train_argv: list[str], others: list[Path], run_dir: Path, calibrate_on: Path | None = None
              ) -> list[str]:
    """pt_train.py's arguments for one fold: the user's, the other folders (but the one calibrated on), the fold's
    run folder, and --resume where an earlier attempt left a checkpoint."""
    resume = ["--resume"] if (run_dir / "last.pt").is_file() and "--resume" not in train_argv else []
    calibration = ["--calibration_path", str(calibrate_on)] if calibrate_on else []
    return [*train_argv, "--xtrain_path", *(str(root) for root in others if root != calibrate_on), *calibration,
            "--save_dir", str(run_dir), *resume]


def full_fold(fold: str, left_out: dict[str, Path], argv: list[str], out_dir: Path, per_class: int
              ) -> dict[str, dict]:
    """Train on the other folders (pt_train.py) and score each folder left out (evaluate.py)."""
    if pt_train.main(argv) != 0:
        raise UsageError(f"Training without {', '.join(left_out)} failed (see the log above); fix it and run this "
                         "command again to continue.")
    rows = {}
    for name, root in left_out.items():
        report = out_dir / name / "report"
        # a folder may hold classes the others lack (the Kaggle signer's del, nothing and space): they cannot be read
        eval_argv = ["--model_dir", str(out_dir / fold / "run"), "--test_dir", str(root), "--out_dir", str(report),
                     "--known_classes_only", *(["--max_per_class", str(per_class)] if per_class else [])]
        m = evaluate.evaluate(evaluate.parse_args(eval_argv), eval_argv).scores.metrics
        trust = m["trust"]
        rows[name] = {"fold": fold, "images": m["n_images"], "hand_found": m.get("hands", {}).get("found_share"),
                      "accuracy": m["accuracy"], "top3": m[f"top{evaluate.TOP_K}_accuracy"],
                      "answered": trust["coverage"], "right_when_answered": trust["accuracy_when_answered"],
                      "ece": trust["ece"], "weak": m["weak_classes"], "report": str(report / "report.md"),
                      "by_threshold": trust["by_threshold"]}
    return rows


def hands_only_fold(fold: str, left_out: dict[str, Path], argv: list[str], per_class: int) -> dict[str, dict]:
    """Train the landmark network alone on the other folders (as pt_train.py trains it) and score it on the
    hands found in each folder left out, with the temperature fitted on its own validation hands."""
    args = pt_train.parse_args(argv)
    if args.hands == "none":
        raise UsageError("--hands_only trains the landmark network: leave out --hands none.")
    prepared = pt_train.prepare(args)
    if prepared["hands"] is None:
        raise UsageError("Too few hands were found in the training folders to train the landmark network.")
    splits = pt_train.make_splits(args, prepared)
    net = pt_train.train_hand_net(args, 0, 1, None, prepared, splits).eval()
    classes = prepared["images"].classes
    val_set, _ = pt_train.hand_set(splits.val_samples, prepared["hands"], False)
    temperature = calibration.fit_temperature(*calibration.collect_logits(
        net, data_loader.make_loader(val_set, 4 * pt_train.HAND_BATCH_SIZE, train=False, num_workers=0)))
    rows = {}
    with hands.HandFinder(args.hand_model) as finder:
        for name, root in left_out.items():
            # scan_folders numbers classes the model does not know after its own: those images cannot be read
            samples = [(path, label) for path, label in data_loader.scan_folders([root], classes).samples
                       if label < len(classes)]
            samples = evaluate.subsample(samples, per_class, 0) if per_class else samples
            found = hands.find_hands([path for path, _ in samples], finder, image_io.load_rgb,
                                     workers=max(1, args.num_workers))
            kept = [i for i, hand in enumerate(found) if hand is not None]
            if not kept:
                raise UsageError(f"MediaPipe found no hand in '{root}': there is nothing to score.")
            features = torch.from_numpy(np.stack([hands.features(found[i]) for i in kept]))
            targets = torch.tensor([samples[i][1] for i in kept])
            with torch.no_grad():
                logits = net(features).float()
            scores = evaluate.compute_metrics(targets.numpy(), torch.softmax(logits / temperature, dim=1).numpy(),
                                              classes)
            rows[name] = {"fold": fold, "images": len(samples), "hand_found": len(kept) / len(samples),
                          "accuracy": scores.metrics["accuracy"],
                          "top3": scores.metrics[f"top{evaluate.TOP_K}_accuracy"],
                          "ece": calibration.expected_calibration_error(logits, targets, temperature),
                          "weak": scores.metrics["weak_classes"]}
    return rows


def table_markdown(rows: dict[str, dict], hands_only: bool) -> str:
    """One row per folder left out, then the mean of the numeric columns (each row weighs the same: a signer is
    a signer, however many photos they gave). With --groups, a column names the fold that left each out."""
    what = "the landmark network alone, on the hands found" if hands_only else "the whole model, as the app reads"
    grouped = any(row.get("fold", name) != name for name, row in rows.items())
    columns = [("images", "images", "{:d}"), ("hand_found", "hand found", "{:.1%}"), ("accuracy", "accuracy", "{:.4f}"),
               ("top3", "top-3", "{:.4f}")]
    if not hands_only:
        columns += [("answered", "app answers", "{:.1%}"), ("right_when_answered", "right when answered", "{:.4f}")]
    columns += [("ece", "ECE", "{:.4f}")]
    by = "the others" if not grouped else "the folders outside its group (the fold)"
    lines = [f"Each folder scored by a model trained on {by} ({what}).", "",
             "| left out | " + "fold | " * grouped + " | ".join(title for _, title, _ in columns)
             + f" | recall < {evaluate.WEAK_RECALL} |", "|---" * (len(columns) + 2 + grouped) + "|"]

    def cell(value, fmt: str) -> str:
        return "n/a" if value is None else fmt.format(value)

    for name, row in rows.items():
        weak = "; ".join(evaluate.read_as_text(w) for w in row["weak"]) or "none"
        lines.append(f"| {name} | " + f"{row['fold']} | " * grouped
                     + " | ".join(cell(row[key], fmt) for key, _, fmt in columns) + f" | {weak} |")
    means = {key: float(np.mean([row[key] for row in rows.values() if row[key] is not None]))
             for key, _, _ in columns[1:] if any(row[key] is not None for row in rows.values())}
    lines.append("| **mean** | " + "| " * grouped + "| "
                 + " | ".join(cell(means.get(key), fmt) for key, _, fmt in columns[1:]) + " | |")
    return "\n".join(lines) + "\n"


def pooled_trust(rows: list[dict], threshold: float) -> dict:
    """What the app does at `threshold` on all these folders' photos together: the share it answers and how often
    rightly (each folder's `by_threshold` row, weighted by its photos)."""
    at = [(row["images"], next(r for r in row["by_threshold"] if r["threshold"] == threshold)) for row in rows]
    answered = sum(n * r["coverage"] for n, r in at)
    right = sum(n * r["coverage"] * r["accuracy_when_answered"] for n, r in at if r["accuracy_when_answered"])
    return {"threshold": threshold, "coverage": answered / sum(n for n, _ in at),
            "accuracy_when_answered": right / answered if answered else None}


def fitted_threshold(rows: dict[str, dict]) -> dict:
    """The app's threshold fitted on the people left out (predict.fit_threshold on their photos pooled), and how a
    threshold fitted so holds on people outside the fit: each fold's people read at the threshold fitted on the
    other folds' (the mean over those people of the share answered and how often rightly)."""
    def fit(chosen: list[dict]) -> float | None:
        return predict.fit_threshold([pooled_trust(chosen, t) for t in predict.THRESHOLD_STEPS])

    threshold = fit(list(rows.values()))
    per_fold, checked = {}, []
    for fold in sorted({row["fold"] for row in rows.values()}):
        per_fold[fold] = fit([row for row in rows.values() if row["fold"] != fold])
        at = predict.DEFAULT_THRESHOLD if per_fold[fold] is None else per_fold[fold]
        checked += [pooled_trust([row], at) for row in rows.values() if row["fold"] == fold]
    right = [c["accuracy_when_answered"] for c in checked if c["accuracy_when_answered"] is not None]
    return {"threshold": predict.DEFAULT_THRESHOLD if threshold is None else threshold,
            "precision_wanted": predict.ANSWER_PRECISION, "reached": threshold is not None, "people": len(rows),
            "by_threshold": [pooled_trust(list(rows.values()), t) for t in predict.THRESHOLD_STEPS],
            "cross_fitted": {"per_fold": per_fold, "answered": float(np.mean([c["coverage"] for c in checked])),
                             "right_when_answered": float(np.mean(right)) if right else None,
                             "people_below_precision": sum(r < predict.ANSWER_PRECISION for r in right)}}


def threshold_markdown(fitted: dict) -> str:
    """fitted_threshold's answer in words, under the table."""
    cross = fitted["cross_fitted"]
    if not fitted["reached"]:
        return (f"\nNo threshold makes the app's answers on these people right {fitted['precision_wanted']:.0%} of "
                f"the time: a model keeps the app's default, {predict.DEFAULT_THRESHOLD}.\n")
    at = next(r for r in fitted["by_threshold"] if r["threshold"] == fitted["threshold"])
    return (f"\nThe app's threshold fitted on these {fitted['people']} people (their photos pooled): "
            f"**{fitted['threshold']:.2f}**, the lowest at which its answers are right {fitted['precision_wanted']:.0%} "
            f"of the time (it answers {at['coverage']:.1%}, right on {at['accuracy_when_answered']:.4f}); train with "
            f"`--threshold {fitted['threshold']:.2f}` to make it the model's. Fitted on the other folds' people "
            f"only, each person is answered {cross['answered']:.1%} of the time, right on "
            f"{cross['right_when_answered']:.4f} (mean over people; {cross['people_below_precision']} below "
            f"{fitted['precision_wanted']:.0%}).\n")


def run(args: argparse.Namespace, train_argv: list[str]) -> dict[str, dict]:
    """Every fold not yet scored, then the table of every folder scored in OUT_DIR."""
    seed = pt_train.parse_args([*train_argv, "--xtrain_path", "."]).seed  # pt_train's own errors before any training
    if "--calibration_path" in train_argv:
        raise UsageError("Name the folders to calibrate on with --calibrate_on (folder names, as in the table): each "
                         "fold then calibrates on one of them that it does not leave out.")
    if args.score_per_class < 0:
        raise UsageError(f"--score_per_class is a number of photos a letter (got {args.score_per_class}); 0 scores "
                         "them all.")
    roots = (data_sources.resolve(args.data, args.data_dir) if args.data else []) + [
        data_loader.training_folder(source) for source in args.xtrain_path or ()]
    all_names = pt_train.folder_names([str(root) for root in roots])
    check_names(all_names, "--folds", args.folds)
    check_names(all_names, "--calibrate_on", args.calibrate_on)
    if args.groups is not None and not 2 <= args.groups <= len(roots):
        raise UsageError(f"--groups {args.groups}: deal the {len(roots)} training folders into 2 to {len(roots)} "
                         "groups.")
    if len(roots) < 2 + bool(args.calibrate_on):
        raise UsageError("Leaving one folder out needs at least two training folders (--data or --xtrain_path), and "
                         "one more to calibrate on with --calibrate_on.")
    out_dir = Path(args.out_dir)
    folds = folds_of(all_names, args.groups, seed)
    check_deal(out_dir, folds)
    root_of = dict(zip(all_names, roots))
    for fold, members in folds.items():
        if args.folds and not set(members) & set(args.folds):
            continue
        if all((out_dir / name / ROW_FILE).is_file() for name in members):
            log.info("Left out %s: scored already (%s)", ", ".join(members), out_dir)
            continue
        calibrate_on = next((root_of[c] for c in args.calibrate_on if c not in members), None)
        if args.calibrate_on and calibrate_on is None:
            raise UsageError(f"--calibrate_on names only {', '.join(repr(m) for m in members)}, left out here: name "
                             "another to calibrate on.")
        log.info("Leaving out %s: training on the other folders%s", ", ".join(members),
                 f", calibrating on {all_names[roots.index(calibrate_on)]}" if calibrate_on else "")
        left_out = {name: root_of[name] for name in members}
        argv = fold_argv(train_argv, [root_of[n] for n in all_names if n not in members], out_dir / fold / "run",
                         calibrate_on)
        rows = (hands_only_fold(fold, left_out, argv, args.score_per_class) if args.hands_only
                else full_fold(fold, left_out, argv, out_dir, args.score_per_class))
        for name, row in rows.items():
            run_artifacts.save_json(row, out_dir / name / ROW_FILE)
            log.info("Left out %s: accuracy %.4f", name, row["accuracy"])
    # every folder scored so far, also by earlier calls with other --folds
    rows = {name: run_artifacts.load_json(out_dir / name / ROW_FILE) for name in all_names
            if (out_dir / name / ROW_FILE).is_file()}
    run_artifacts.save_json(rows, out_dir / "table.json")
    table = table_markdown(rows, args.hands_only)
    # a threshold needs the app's answers (a whole model's rows) and people outside each fit to check it on
    if all("by_threshold" in row for row in rows.values()) and len({row["fold"] for row in rows.values()}) > 1:
        fitted = fitted_threshold(rows)
        run_artifacts.save_json(fitted, out_dir / "threshold.json")
        table += threshold_markdown(fitted)
    run_artifacts.save_bytes(table.encode(), out_dir / "table.md")
    return rows


def main(argv: list[str] | None = None) -> int:
    args, train_argv = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    try:
        run(args, train_argv)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    print((Path(args.out_dir) / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
