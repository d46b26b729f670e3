"""Accuracy and speed of one model in every deployment format, in one run on this machine:

    python tools/benchmark_formats.py --weights W.pth [--config configs/X.yaml] \
        [--out runs/benchmark_formats] [--formats eager compile torchscript onnx onnx-int8] \
        [--calibration train] [--calibration-images 64] [--latency-images 50] [--rounds 2] [key=value ...]

Formats: eager PyTorch (Detector), `model.compile_inference` (torch.compile), TorchScript and
ONNX Runtime float32 (tools/export.py's files) and ONNX Runtime INT8 (--int8, calibrated on
--calibration). Each runs on the config's validation split (data.val) on the CPU, with
torch.get_num_threads() threads for every format (onnxruntime's intra-op threads too):

- mAP and AP50 (COCO, x100) from one pass over the split at eval.batch_size;
- images/s at eval.batch_size: images over the time of the predict calls of a full pass
  (network, postprocessing and rescaling; reading and preprocessing the images are not timed);
- ms/image at batch 1: the median over the first --latency-images images;
- file size: the exported file; for eager and compile, the float32 state dict as torch.save writes it;
- "same as eager": detections of eager's without a counterpart (same image and label, box within
  1e-3 px, score within 1e-4) and the other way round, for the formats that compute the same
  thing (compile, TorchScript, ONNX float32). TorchScript runs torch's kernels on the same
  tensors and must match bit for bit; the others round differently (fused or reordered float32
  arithmetic), which can move a detection that sits on the score threshold, the top-k cut or an
  NMS overlap across it: at most 0.1 % of eager's detections may be unmatched, and mAP may differ
  by at most 0.1 point. Exit code 1 when a format breaks its bound.

Timings are the best of --rounds passes, the formats taking turns in each round, so that a slow
spell of a shared machine does not land on one format only. Writes OUT/formats.json (the rows,
the CPU, torch and onnxruntime versions, the date, the command) and OUT/formats.md (the table).
Exported files go to OUT/files/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, run_cli  # noqa: E402

FORMATS = ("eager", "compile", "torchscript", "onnx", "onnx-int8")
SAME_AS_EAGER = {"compile": 0.001, "torchscript": 0.0, "onnx": 0.001}  # share of unmatched detections
MAX_AP_DIFF = 0.1  # points of mAP (x100) between eager and the formats of SAME_AS_EAGER
BOX_TOL, SCORE_TOL = 1e-3, 1e-4


def main() -> int:
    parser = config_parser(__doc__, config_required=False)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--weights", required=True, help="checkpoint (.pth); a bare state dict needs --config")
    parser.add_argument("--out", default="runs/benchmark_formats",
                        help="folder for formats.json, formats.md and the exported files")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--calibration", default="train",
                        help="INT8 calibration images: a split (train, val) or a folder (default train)")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--latency-images", type=int, default=50, help="images timed at batch 1")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per format (best kept)")
    args = parser.parse_args()
    import torch

    from retinanet import export, quantize
    from retinanet.data import build_dataset, build_test_loader
    from retinanet.detector import load_detector
    from retinanet.engine.validation import build_evaluator
    from retinanet.predictor import Predictor

    detector = load_detector(args.weights, args.config, args.overrides, device="cpu")
    config = detector.config
    out = Path(args.out)
    files_dir = out / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(config.data, train=False)
    batch_size = config.eval.batch_size

    def loader(size):
        return build_test_loader(dataset, batch_size=size, num_workers=0,
                                 size_divisibility=config.data.size_divisibility)

    # every format: predict(batch) -> per image detections in original pixels, and its file
    model = export.prepare_for_export(Predictor(detector.model, postprocessor=detector.postprocessor))
    example = next(iter(loader(2))).images
    predictors, sizes = {}, {}
    state = files_dir / "model_fp32_state_dict.pth"
    torch.save(detector.model.state_dict(), state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        if "eager" in args.formats:
            predictors["eager"], sizes["eager"] = detector.predict_batch, state
        if "compile" in args.formats:
            compiled = load_detector(args.weights, args.config,
                                     [*args.overrides, "model.compile_inference=true"], device="cpu")
            predictors["compile"], sizes["compile"] = compiled.predict_batch, state
        if "torchscript" in args.formats:
            scripted = export.export_torchscript(model, example, files_dir / "model.pt")
            predictors["torchscript"] = _graph_predictor(scripted, export, torch)
            sizes["torchscript"] = files_dir / "model.pt"
        if {"onnx", "onnx-int8"} & set(args.formats):
            fp32 = files_dir / "model.onnx"
            export.export_onnx(model, example, fp32)
            if "onnx" in args.formats:
                predictors["onnx"] = _onnx_predictor(export.onnx_session(fp32), export)
                sizes["onnx"] = fp32
        if "onnx-int8" in args.formats:
            int8 = files_dir / "model_int8.onnx"
            calibration = quantize.calibration_files(args.calibration, config, args.calibration_images)
            quantize.quantize_onnx(fp32, int8, quantize.calibration_batches(detector, calibration),
                                   method=args.calibration_method)
            predictors["onnx-int8"] = _onnx_predictor(export.onnx_session(int8), export)
            sizes["onnx-int8"] = int8

        rows, predictions = {}, {}
        evaluator = build_evaluator(config, dataset, output_dir=None)
        evaluator.loader = loader(batch_size)
        for name, predict in predictors.items():  # accuracy, and the warm-up (compilation) too
            with torch.inference_mode():
                result = evaluator(predict, log=lambda line: None)
                _time_batch1(predict, loader(1), 3)  # compiles batch 1 before it is timed
            metrics = result["metrics"]
            predictions[name] = result["predictions"]
            rows[name] = {"format": name, "mAP": 100 * metrics["AP"], "AP50": 100 * metrics["AP50"],
                          "detections": sum(len(p["scores"]) for p in result["predictions"].values()),
                          "file": str(sizes[name]), "size_mb": sizes[name].stat().st_size / 2**20,
                          "images_per_s": 0.0, "ms_per_image_b1": float("inf")}
            print(f"{name}: mAP {rows[name]['mAP']:.2f}", flush=True)
        for _ in range(args.rounds):
            for name, predict in predictors.items():
                with torch.inference_mode():
                    throughput = _throughput(predict, loader(batch_size))
                    latency = _time_batch1(predict, loader(1), args.latency_images)
                rows[name]["images_per_s"] = max(rows[name]["images_per_s"], throughput)
                rows[name]["ms_per_image_b1"] = min(rows[name]["ms_per_image_b1"], latency)
    failures = _check_same(rows, predictions)
    document = {"date": datetime.date.today().isoformat(), "machine": _machine(torch),
                "command": "python " + " ".join(sys.argv), "weights": str(args.weights),
                "val_images": len(dataset), "eval_batch_size": batch_size,
                "latency_images": min(args.latency_images, len(dataset)), "rounds": args.rounds,
                "calibration": {"source": args.calibration, "images": args.calibration_images,
                                "method": args.calibration_method},
                "same_as_eager_bound": {"box_px": BOX_TOL, "score": SCORE_TOL, "unmatched_share": SAME_AS_EAGER,
                                        "map_points": MAX_AP_DIFF},
                "rows": list(rows.values()), "failures": failures}
    (out / "formats.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "formats.md").write_text(_markdown(document))
    print(_markdown(document))
    print(f"wrote {out / 'formats.json'} and {out / 'formats.md'}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _graph_predictor(graph, export, torch):
    """An exported graph (images -> padded outputs) as a predict(batch) callable."""
    def predict(batch):
        with torch.no_grad():
            outputs = graph(batch.images)
        return export.per_image_detections(outputs, batch.image_sizes, batch.orig_sizes)
    return predict


def _onnx_predictor(session, export):
    def predict(batch):
        return export.per_image_detections(export.run_onnx(session, batch.images), batch.image_sizes,
                                           batch.orig_sizes)
    return predict


def _throughput(predict, loader) -> float:
    """Images per second of the predict calls over the loader (loading not timed)."""
    seconds = images = 0
    for batch in loader:
        start = time.perf_counter()
        predict(batch)
        seconds += time.perf_counter() - start
        images += len(batch.image_ids)
    return images / seconds


def _time_batch1(predict, loader, count: int) -> float:
    """Median ms of predict over the first `count` batches of one image."""
    times = []
    for batch, _ in zip(loader, range(count)):
        start = time.perf_counter()
        predict(batch)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _unmatched(reference: dict, other: dict) -> int:
    """Detections of either side ({image_id: {"boxes", "scores", "labels"}}) with no detection of
    the same image and label on the other side within BOX_TOL px and SCORE_TOL."""
    count = 0
    for image_id, ref in reference.items():
        got = other[image_id]
        close = ((ref["labels"][:, None] == got["labels"][None, :])
                 & ((ref["boxes"][:, None] - got["boxes"][None]).abs().amax(-1) <= BOX_TOL)
                 & ((ref["scores"][:, None] - got["scores"][None, :]).abs() <= SCORE_TOL))
        count += int((~close.any(1)).sum()) + int((~close.any(0)).sum())
    return count


def _check_same(rows: dict, predictions: dict) -> list[str]:
    """Fills rows' "unmatched_vs_eager"; one line per format outside its bound."""
    failures = []
    if "eager" not in predictions:
        return failures
    for name, row in rows.items():
        if name == "eager":
            continue
        row["unmatched_vs_eager"] = _unmatched(predictions["eager"], predictions[name])
        if name not in SAME_AS_EAGER:
            continue
        allowed = SAME_AS_EAGER[name] * rows["eager"]["detections"]
        ap_diff = abs(row["mAP"] - rows["eager"]["mAP"])
        if row["unmatched_vs_eager"] > allowed or ap_diff > MAX_AP_DIFF + 1e-9:
            failures.append(f"{name} does not give eager's detections: {row['unmatched_vs_eager']} "
                            f"unmatched (at most {allowed:.0f}), mAP differs by {ap_diff:.3f} "
                            f"(at most {MAX_AP_DIFF})")
    return failures


def _machine(torch) -> dict:
    """The CPU (model name and the vector extensions that matter for INT8), threads, versions."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"cpu": cpu, "cpu_flags": [f for f in wanted if f in flags], "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": ort_version, "python": platform.python_version()}


def _markdown(document: dict) -> str:
    machine = document["machine"]
    lines = [f"**{machine['cpu']}** ({', '.join(machine['cpu_flags']) or 'no AVX2'}), "
             f"{machine['threads']} threads, torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, "
             f"{document['date']} · `{document['command']}` · {document['val_images']} validation images, "
             f"eval batch {document['eval_batch_size']}",
             "",
             "| format | mAP | AP50 | ms/image (batch 1) | images/s (batch "
             f"{document['eval_batch_size']}) | file MB | detections | unmatched vs eager |",
             "|---|---|---|---|---|---|---|---|"]
    for row in document["rows"]:
        lines.append(f"| {row['format']} | {row['mAP']:.2f} | {row['AP50']:.2f} | "
                     f"{row['ms_per_image_b1']:.1f} | {row['images_per_s']:.1f} | {row['size_mb']:.1f} | "
                     f"{row['detections']} | {row.get('unmatched_vs_eager', '–')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main)
