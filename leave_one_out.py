"""Leave one signer out: how well a model reads a person it never saw, without touching a test set.

    python leave_one_out.py --xtrain_path ../shared/asl/train ../shared/asl/signers/* --out_dir reports/loso
    python leave_one_out.py --xtrain_path ... --out_dir reports/loso-hands --hands_only   # seconds per fold
    python leave_one_out.py --xtrain_path ... --out_dir reports/loso --folds mariia omega --total_epochs 4

Each training folder holds one signer (or one group of signers). For each folder (or those named by --folds) a
model is trained on all the other folders, with pt_train.py's options (any of them may follow this command's
own), and scored on the folder left out with evaluate.py: a person the model never saw. The table
(OUT_DIR/table.md and table.json) has one row per folder left out, and its mean; each fold keeps its run
(OUT_DIR/NAME/run) and its evaluation report (OUT_DIR/NAME/report). Choose designs by this table: a test set
stays honest only while nothing is chosen by it.

`--hands_only` trains the landmark network alone on the other folders' hands and scores it on the hands found
in the folder left out: a cheap first look at a design of the landmark network or of the data mix.

A killed run continues where it stopped: folds already scored are kept, and a fold's training resumes from its
last checkpoint. Exit code 2 means a problem with the input, explained in one line.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

import calibration
import data_loader
import evaluate
import hands
import image_io
import pt_train
import run_artifacts
from errors import UsageError

log = logging.getLogger("leave_one_out")

EXIT_USAGE = 2
ROW_FILE = "row.json"  # a fold's figures, in its folder: written last, so it marks the fold as done


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This command's own options, and the rest: pt_train.py's."""
    # no abbreviations: pt_train's --hands would be read as this command's --hands_only
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--xtrain_path", nargs="+", required=True,
                   help="the training folders (or Kaggle datasets, OWNER/DATASET), each one signer or one group")
    p.add_argument("--out_dir", default="reports/leave_one_out", help="runs, reports and the table go here")
    p.add_argument("--folds", nargs="+", metavar="NAME",
                   help="leave out only these folders (by name, as in the table); default: each in turn")
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


def fold_argv(train_argv: list[str], others: list[Path], run_dir: Path, calibrate_on: Path | None = None
              ) -> list[str]:
    """pt_train.py's arguments for one fold: the user's, the other folders (but the one calibrated on), the fold's
    run folder, and --resume where an earlier attempt left a checkpoint."""
    resume = ["--resume"] if (run_dir / "last.pt").is_file() and "--resume" not in train_argv else []
    calibration = ["--calibration_path", str(calibrate_on)] if calibrate_on else []
    return [*train_argv, "--xtrain_path", *(str(root) for root in others if root != calibrate_on), *calibration,
            "--save_dir", str(run_dir), *resume]


def full_fold(name: str, left_out: Path, argv: list[str], fold_dir: Path) -> dict:
    """Train on the other folders (pt_train.py) and score the folder left out (evaluate.py)."""
    if pt_train.main(argv) != 0:
        raise UsageError(f"Training without '{name}' failed (see the log above); fix it and run this command again "
                         "to continue.")
    report = fold_dir / "report"
    # a folder may hold classes the others lack (the Kaggle signer's del, nothing and space): they cannot be read
    eval_argv = ["--model_dir", str(fold_dir / "run"), "--test_dir", str(left_out), "--out_dir", str(report),
                 "--known_classes_only"]
    m = evaluate.evaluate(evaluate.parse_args(eval_argv), eval_argv).scores.metrics
    trust = m["trust"]
    return {"images": m["n_images"], "hand_found": m.get("hands", {}).get("found_share"),
            "accuracy": m["accuracy"], "top3": m[f"top{evaluate.TOP_K}_accuracy"],
            "answered": trust["coverage"], "right_when_answered": trust["accuracy_when_answered"],
            "ece": trust["ece"], "weak": m["weak_classes"], "report": str(report / "report.md")}


def hands_only_fold(left_out: Path, argv: list[str]) -> dict:
    """Train the landmark network alone on the other folders (as pt_train.py trains it) and score it on the
    hands found in the folder left out, with the temperature fitted on its own validation hands."""
    args = pt_train.parse_args(argv)
    if args.hands == "none":
        raise UsageError("--hands_only trains the landmark network: leave out --hands none.")
    prepared = pt_train.prepare(args)
    if prepared["hands"] is None:
        raise UsageError("Too few hands were found in the training folders to train the landmark network.")
    splits = pt_train.make_splits(args, prepared)
    net = pt_train.train_hand_net(args, 0, 1, None, prepared, splits)
    classes = prepared["images"].classes
    # scan_folders numbers classes the model does not know after its own: those images cannot be read
    samples = [(path, label) for path, label in data_loader.scan_folders([left_out], classes).samples
               if label < len(classes)]
    paths = [path for path, _ in samples]
    with hands.HandFinder(args.hand_model) as finder:
        found = hands.find_hands(paths, finder, image_io.load_rgb, workers=max(1, args.num_workers))
    rows = [i for i, hand in enumerate(found) if hand is not None]
    if not rows:
        raise UsageError(f"MediaPipe found no hand in '{left_out}': there is nothing to score.")
    val_set, _ = pt_train.hand_set(splits.val_samples, prepared["hands"], False)
    temperature = calibration.fit_temperature(*calibration.collect_logits(
        net, data_loader.make_loader(val_set, 4 * pt_train.HAND_BATCH_SIZE, train=False, num_workers=0)))
    features = torch.from_numpy(np.stack([hands.features(found[i]) for i in rows]))
    targets = torch.tensor([samples[i][1] for i in rows])
    with torch.no_grad():
        logits = net.eval()(features).float()
    probs = torch.softmax(logits / temperature, dim=1).numpy()
    scores = evaluate.compute_metrics(targets.numpy(), probs, classes)
    return {"images": len(paths), "hand_found": len(rows) / len(paths), "accuracy": scores.metrics["accuracy"],
            "top3": scores.metrics[f"top{evaluate.TOP_K}_accuracy"],
            "ece": calibration.expected_calibration_error(logits, targets, temperature),
            "weak": scores.metrics["weak_classes"]}


def table_markdown(rows: dict[str, dict], hands_only: bool) -> str:
    """One row per folder left out, then the mean of the numeric columns (each row weighs the same: a signer is
    a signer, however many photos they gave)."""
    what = "the landmark network alone, on the hands found" if hands_only else "the whole model, as the app reads"
    columns = [("images", "images", "{:d}"), ("hand_found", "hand found", "{:.1%}"), ("accuracy", "accuracy", "{:.4f}"),
               ("top3", "top-3", "{:.4f}")]
    if not hands_only:
        columns += [("answered", "app answers", "{:.1%}"), ("right_when_answered", "right when answered", "{:.4f}")]
    columns += [("ece", "ECE", "{:.4f}")]
    lines = [f"Each folder scored by a model trained on the others ({what}).", "",
             "| left out | " + " | ".join(title for _, title, _ in columns) + f" | recall < {evaluate.WEAK_RECALL} |",
             "|---" * (len(columns) + 2) + "|"]

    def cell(value, fmt: str) -> str:
        return "n/a" if value is None else fmt.format(value)

    for name, row in rows.items():
        weak = "; ".join(evaluate.read_as_text(w) for w in row["weak"]) or "none"
        lines.append(f"| {name} | " + " | ".join(cell(row[key], fmt) for key, _, fmt in columns) + f" | {weak} |")
    means = {key: float(np.mean([row[key] for row in rows.values() if row[key] is not None]))
             for key, _, _ in columns[1:] if any(row[key] is not None for row in rows.values())}
    lines.append("| **mean** | | " + " | ".join(cell(means.get(key), fmt) for key, _, fmt in columns[1:]) + " | |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, train_argv: list[str]) -> dict[str, dict]:
    """Every fold not yet scored, then the table of every fold scored in OUT_DIR."""
    pt_train.parse_args([*train_argv, "--xtrain_path", "."])  # pt_train's own errors before any training
    if "--calibration_path" in train_argv:
        raise UsageError("Name the folders to calibrate on with --calibrate_on (folder names, as in the table): each "
                         "fold then calibrates on one of them that it does not leave out.")
    roots = [data_loader.training_folder(source) for source in args.xtrain_path]
    all_names = pt_train.folder_names([str(root) for root in roots])
    check_names(all_names, "--folds", args.folds)
    check_names(all_names, "--calibrate_on", args.calibrate_on)
    if len(roots) < 2 + bool(args.calibrate_on):
        raise UsageError("Leaving one folder out needs at least two training folders in --xtrain_path, and one more "
                         "to calibrate on with --calibrate_on.")
    out_dir = Path(args.out_dir)
    for name in [name for name in all_names if not args.folds or name in args.folds]:
        k = all_names.index(name)
        fold_dir = out_dir / name
        if (fold_dir / ROW_FILE).is_file():
            log.info("Left out %s: scored already (%s)", name, fold_dir / ROW_FILE)
            continue
        calibrate_on = next((roots[all_names.index(c)] for c in args.calibrate_on if c != name), None)
        if args.calibrate_on and calibrate_on is None:
            raise UsageError(f"--calibrate_on names only '{name}', the folder left out: name another to calibrate on.")
        log.info("Leaving out %s: training on the other folders%s", name,
                 f", calibrating on {all_names[roots.index(calibrate_on)]}" if calibrate_on else "")
        argv = fold_argv(train_argv, [root for i, root in enumerate(roots) if i != k], fold_dir / "run", calibrate_on)
        row = hands_only_fold(roots[k], argv) if args.hands_only else full_fold(name, roots[k], argv, fold_dir)
        fold_dir.mkdir(parents=True, exist_ok=True)
        run_artifacts.save_json(row, fold_dir / ROW_FILE)
        log.info("Left out %s: accuracy %.4f", name, row["accuracy"])
    # every fold scored so far, also by earlier calls with other --folds
    rows = {name: run_artifacts.load_json(out_dir / name / ROW_FILE) for name in all_names
            if (out_dir / name / ROW_FILE).is_file()}
    run_artifacts.save_json(rows, out_dir / "table.json")
    run_artifacts.save_bytes(table_markdown(rows, args.hands_only).encode(), out_dir / "table.md")
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
