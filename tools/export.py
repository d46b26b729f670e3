"""Export a model for deployment, with anchors, box decoding and NMS inside the graph:

    python tools/export.py --weights W.pth --format onnx|torchscript --output FILE \
        [--config configs/X.yaml] [--opset 17] [--height H --width W] [key=value ...]
    python tools/export.py --weights W.pth --format onnx --int8 --calibration train|val|DIR \
        --output FILE [--calibration-images 64] [--calibration-method minmax] [--keep-float stem]

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

--int8 writes the ONNX graph statically quantized for CPU (retinanet/quantize.py: QDQ, int8
weights per channel, uint8 activations, postprocessing in float32), calibrated on --calibration:
a split of the config (train, val) or a folder of images, preprocessed as Detector does. Instead
of the eager check, it prints how many of float32's detections (score >= 0.3) the INT8 file
finds on the first calibration images.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, run_cli  # noqa: E402
from retinanet.errors import ConfigError  # noqa: E402

EXAMPLE_BATCH = 2  # more than 1, so that nothing in the trace can take the batch axis for a constant
CHECK_IMAGES = 16  # calibration images on which --int8 compares INT8 with float32


def main() -> int:
    parser = config_parser(__doc__, config_required=False)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--weights", required=True, help="checkpoint (.pth); a bare state dict needs --config")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    parser.add_argument("--output", required=True, help="file to write (.onnx or .pt)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16; default 17)")
    parser.add_argument("--height", type=int, default=None, help="example input height")
    parser.add_argument("--width", type=int, default=None, help="example input width")
    parser.add_argument("--int8", action="store_true", help="ONNX only: static INT8 quantization for CPU")
    parser.add_argument("--calibration", default=None,
                        help="with --int8: a split of the config (train, val) or a folder of images")
    parser.add_argument("--calibration-images", type=int, default=64,
                        help="with --int8: images to calibrate on, spread over the source (default 64)")
    parser.add_argument("--calibration-method", default="minmax",
                        choices=["minmax", "entropy", "percentile"],
                        help="with --int8: how activation ranges are chosen (default minmax)")
    parser.add_argument("--keep-float", nargs="*", default=[], choices=["stem", "outputs"],
                        help="with --int8: convolutions left in float32 (the stem; the heads' last)")
    parser.add_argument("--reduce-range", action="store_true",
                        help="with --int8: 7-bit weights (for CPUs without VNNI, where uint8 x int8 "
                             "products can saturate)")
    args = parser.parse_args()
    from retinanet import export

    if args.int8 and (args.format != "onnx" or not args.calibration):
        raise ConfigError("--int8 quantizes the ONNX graph: give --format onnx and --calibration "
                          "(train, val or a folder of images)")
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
    if args.int8:
        from retinanet import quantize

        return _export_int8(args, detector, model, images, output, export, quantize)
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


def _export_int8(args, detector, model, images, output: Path, export, quantize) -> int:
    """--int8: the float32 graph to a temporary file, quantized into `output`, then INT8 against
    float32 on the first calibration images (`export`, `quantize`: the package's modules)."""
    files = quantize.calibration_files(args.calibration, detector.config, args.calibration_images)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        fp32 = Path(tmp) / "model_fp32.onnx"
        export.export_onnx(model, images, fp32, opset=args.opset)
        info = quantize.quantize_onnx(fp32, output, quantize.calibration_batches(detector, files),
                                      method=args.calibration_method, keep_float=args.keep_float,
                                      reduce_range=args.reduce_range)
        total, found = quantize.compare_with_float(detector, fp32, output, files[:CHECK_IMAGES])
    print(f"wrote {output} (ONNX opset {args.opset}, INT8 QDQ for CPU: {info['quantized_convs']} "
          f"convolutions quantized, {info['float_convs']} kept in float32, postprocessing float32; "
          f"{args.calibration_method} ranges from {info['calibration_images']} images of "
          f"{args.calibration}); input and outputs as the float32 export's")
    share = f"{100 * found / total:.1f}%" if total else "n/a"
    print(f"INT8 against float32 on {min(len(files), CHECK_IMAGES)} calibration images: {found} of "
          f"{total} float32 detections with score >= 0.3 found ({share}; same label, IoU >= 0.5)")
    return 0


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
