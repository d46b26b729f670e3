"""Export a model for deployment, with anchors, box decoding and NMS inside the graph:

    python tools/export.py --weights W.pth --format onnx|torchscript --output FILE \
        [--config configs/X.yaml] [--opset 17] [--height H --width W] [key=value ...]

A trainer checkpoint carries its config: --config is only needed for a bare state dict.

The exported graph takes normalised, padded float images (B, 3, H, W), H and W multiples of the
config's data.size_divisibility, and returns boxes (B, D, 4) xyxy in the input's pixels, scores
(B, D), labels (B, D) and num_detections (B,), D = model.postprocess.max_detections (rows past
num_detections: zeros, label -1). Resizing, normalisation, padding and rescaling boxes to the
original image size stay with the caller. Batch, height and width are dynamic in both formats;
--height/--width (default: the config's test sizes, padded) only set the example traced with.
The file is checked against eager PyTorch on that example (ONNX with onnxruntime, if installed):
exit code 1 when a detection has no counterpart or the detection counts differ.
ONNX needs `pip install -e .[export]`.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, run_cli  # noqa: E402
from retinanet.errors import ConfigError  # noqa: E402

EXAMPLE_BATCH = 2  # more than 1, so that nothing in the trace can take the batch axis for a constant


def main() -> int:
    parser = config_parser(__doc__, config_required=False)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--weights", required=True, help="checkpoint (.pth); a bare state dict needs --config")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    parser.add_argument("--output", required=True, help="file to write (.onnx or .pt)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16; default 17)")
    parser.add_argument("--height", type=int, default=None, help="example input height")
    parser.add_argument("--width", type=int, default=None, help="example input width")
    args = parser.parse_args()
    from retinanet import export

    if args.format == "onnx":  # before any model work: say what is missing at once
        try:
            export.require_onnx()
        except ModuleNotFoundError as error:
            raise ConfigError(str(error)) from None
        export.check_onnx_opset(args.opset)

    import torch

    from retinanet.detector import load_detector
    from retinanet.predictor import Predictor

    detector = load_detector(args.weights, args.config, args.overrides, device="cpu")
    config = detector.config
    height, width = _example_size(config.data, args.height, args.width)
    model = Predictor(detector.model, postprocessor=detector.postprocessor)
    model = export.prepare_for_export(model)
    images = torch.randn(EXAMPLE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    output = Path(args.output)
    with warnings.catch_warnings():
        # TorchScript and the TorchScript-based ONNX exporter warn that they are deprecated on
        # every call, and the exporter about negative gather indices (ours are never negative).
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        if args.format == "onnx":
            export.export_onnx(model, images, output, opset=args.opset)
            what = f"ONNX opset {args.opset}, dynamic batch, height and width"
            actual = _run_onnx_if_installed(export.run_onnx, output, images)
        else:
            scripted = export.export_torchscript(model, images, output)
            what = ("TorchScript, postprocessing scripted and network traced; dynamic batch, "
                    "height and width; load with torch.jit.load")
            with torch.no_grad():
                actual = scripted(images)
    divisor = config.data.size_divisibility
    print(f"wrote {output} ({what}): input images (B, 3, H, W) normalised and padded, H and W "
          f"multiples of {divisor}; outputs boxes (B, {model.postprocessor.max_detections}, 4) xyxy "
          f"in input pixels, scores, labels (-1 = padding), num_detections")
    if actual is None:
        print("not checked: onnxruntime is not installed (pip install -e .[export])")
        return 0
    diff = export.compare_outputs(expected, actual)
    print(f"checked on a random {tuple(images.shape)} example ({int(expected[3].sum())} "
          f"detections) against eager PyTorch: max |diff| boxes "
          f"{diff['boxes']:.2e} px, scores {diff['scores']:.2e}; rows with another label "
          f"{diff['labels']}, num_detections differ {diff['num_detections']}; detections without "
          f"a counterpart in any order {diff['unmatched']}")
    problem = export.mismatch(diff)
    if problem:
        print(f"error: {output} does not reproduce eager PyTorch on the example: {problem} "
              "(the file is kept for inspection)", file=sys.stderr)
        return 1
    return 0


def _example_size(data_config, height: int | None, width: int | None) -> tuple[int, int]:
    """--height/--width, or the config's test sizes padded like Collate pads them."""
    divisor = data_config.size_divisibility

    def padded(size: int) -> int:
        return int(math.ceil(size / divisor) * divisor)

    height = padded(data_config.test_min_size) if height is None else height
    width = padded(data_config.test_max_size) if width is None else width
    for name, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % divisor:
            raise ConfigError(f"{name} {value} is not a positive multiple of "
                              f"data.size_divisibility ({divisor})")
    return height, width


def _run_onnx_if_installed(run_onnx, path: Path, images):
    """The exported file's outputs on `images` (retinanet.export.run_onnx), or None without
    onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    return run_onnx(path, images)


if __name__ == "__main__":
    run_cli(main)
