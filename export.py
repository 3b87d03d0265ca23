"""Export a trained model's networks to ONNX, for any ONNX runtime: `python export.py MODEL OUT_DIR`.

MODEL is what predict.py loads: a training folder, a checkpoint, or an MLflow model URI. OUT_DIR gets:

* `image_net.onnx`: the image network. Input `images`: float32 NCHW, (N, 3, crop, crop), any N: the RGB photo
  resized so its shorter side is `resize_size` (antialiased, `interpolation`, bilinear by default), centre-cropped
  to `crop_size`, scaled to 0..1 and normalised with `mean` and `std`: all in `model.json`'s `transform`. A crop
  model (`hands.crop` set) reads the square around the hand instead of the whole photo (hands.crop_box: `crop`
  times the landmarks' longer side; the whole photo where no hand is found). Output `logits` (N, classes);
  its probabilities are softmax(logits / `temperature`).
* `landmark_net.onnx`, for a hand-aware model: the landmark network. Input `features`: float32 (N, F), the first
  F (`hands.features` in `model.json`) of hands.features() of the hand MediaPipe found (hands.py: its 21
  landmarks, wrist-centred, size-normalised, left hands mirrored). Output `logits`; probabilities softmax(logits /
  `hands.temperature`).
* `model.json`: the classes (the order of the logits), `transform`, `temperature` and `hands`.

Finding the hand stays MediaPipe's (hands.py: its HandLandmarker with `hand_landmarker.task`, which is a MediaPipe
model, not ONNX). Where a hand is found, predict.py pools the two networks' probabilities (`predict.pool`: their
renormalised geometric mean) and says "unsure" where their most likely classes differ (`predict.decide`);
elsewhere the image network answers alone.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import predict
import run_artifacts
from errors import UsageError

log = logging.getLogger("export")

IMAGE_NET, LANDMARK_NET, MODEL_JSON = "image_net.onnx", "landmark_net.onnx", "model.json"
EXIT_USAGE = 2


def export(source: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write the model's networks and `model.json` into `out_dir` (see the module docstring); the files written."""
    predictor = predict.load_predictor(source)
    meta = predictor.metadata
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crop = predictor.transform_cfg["crop_size"]
    written = [predict.export_onnx(predictor.model, out / IMAGE_NET, (3, crop, crop))]
    if predictor.hand_net is not None:
        written.append(predict.export_onnx(predictor.hand_net, out / LANDMARK_NET, (predict.hand_features(meta),),
                                           "features"))
    hand_settings = ({"features": predict.hand_features(meta), "temperature": meta["hands"].get("temperature", 1.0),
                      "crop": predictor.crop_margin} if predictor.uses_hands else None)
    run_artifacts.save_json({"classes": predictor.classes, "transform": predictor.transform_cfg,
                             "temperature": meta.get("temperature", 1.0), "hands": hand_settings}, out / MODEL_JSON)
    return [*written, out / MODEL_JSON]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a trained model's image network (and landmark network) to "
                                            "ONNX, with model.json (classes, preprocessing, temperatures).")
    p.add_argument("model", help="training folder (--save_dir of pt_train.py), .pt checkpoint, or MLflow model URI")
    p.add_argument("out_dir", help="folder to write image_net.onnx, landmark_net.onnx and model.json to")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    try:
        written = export(args.model, args.out_dir)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    except OSError as err:  # the output folder: the model loaded, so that is what failed
        log.error("Could not write to '%s' (%s). Pass a folder you can write to.", args.out_dir,
                  err.strerror or err)
        return EXIT_USAGE
    log.info("Wrote %s", ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
