"""PyTorch's own INT8 path against ONNX Runtime's, on one trained model, in one run: why
tools/export.py --int8 quantizes with ONNX Runtime (docs/deployment.md#why-this-path).

    pip install torchao   # PT2E quantization lives there since torch 2.10; not a dependency
    python scripts/int8_pt2e_trial.py --weights runs/shapes_R18/model_final.pth \\
        --onnx-int8 runs/benchmark_formats/files/model_int8.onnx [--out runs/int8_pt2e_trial.json]

PT2E: the network (backbone, FPN, heads; anchors and postprocessing stay float32 eager) exported
with torch.export (static shapes, the eval batch), quantized by torchao's X86InductorQuantizer (its default
config: per-channel int8 weights, per-tensor uint8 activations, static), calibrated on the same
training images tools/export.py uses, converted and compiled by inductor with weight freezing.

Result on 2026-12-02 (torch 2.14.1, torchao 0.18.0, the demo model): prepare_pt2e fails while
annotating the graph, ValueError "Input partition has more than one output node" (with a dynamic
batch as well; and with the quantizer's fused conv + add / ReLU patterns switched off, "conv
partition has more than one output node"), so no PT2E row could be measured; docs/deployment.md
says so. Where it runs, the rows are: COCO mAP on the config's validation split and images/s at the eval batch (predict calls
timed, best of --rounds), for float32 compiled (the same compile path without quantization), PT2E
INT8 and the ONNX Runtime INT8 file of tools/export.py --int8.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--onnx-int8", required=True, help="tools/export.py --int8's file for these weights")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="runs/int8_pt2e_trial.json")
    args = parser.parse_args()
    import torch
    from torch import nn
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from benchmark_formats import _machine, _onnx_predictor, _throughput
    from retinanet import export, quantize
    from retinanet.data import build_dataset, build_test_loader
    from retinanet.detector import Detector
    from retinanet.engine.validation import build_evaluator
    from retinanet.model import RetinaNetOutput
    from retinanet.model.fold import fold_batchnorm

    detector = Detector.from_checkpoint(args.weights, device="cpu")
    config = detector.config
    # BatchNorm folded into the convolutions first, NCHW (prepare_pt2e would fold it too)
    network = fold_batchnorm(detector.model.eval()).to(memory_format=torch.contiguous_format)

    class Levels(nn.Module):  # what gets quantized: images -> per-level outputs, no anchors
        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, images):
            cls_logits, box_deltas, _ = self.network.forward_levels(images)
            return tuple(cls_logits), tuple(box_deltas)

    class Quantized(nn.Module):  # RetinaNetOutput from the quantized levels, as Detector expects
        num_classes = network.num_classes

        def __init__(self, levels):
            super().__init__()
            self.levels = levels

        def forward(self, images):
            count = images.shape[0]  # the graph is exported at a static batch: pad to it
            images = torch.cat([images, images.new_zeros(STATIC - count, *images.shape[1:])])
            cls_logits, box_deltas = self.levels(images)
            cls_logits, box_deltas = [c[:count] for c in cls_logits], [b[:count] for b in box_deltas]
            sizes = [(-(-images.shape[-2] // s), -(-images.shape[-1] // s)) for s in (8, 16, 32, 64, 128)]
            generator = network.anchor_generator
            anchors = generator(sizes, images.device, image_size=tuple(images.shape[-2:]))
            return RetinaNetOutput(torch.cat(cls_logits, 1), torch.cat(box_deltas, 1), anchors,
                                   generator.num_anchors_per_level(sizes))

    dataset = build_dataset(config.data, train=False)
    loader = build_test_loader(dataset, batch_size=config.eval.batch_size, num_workers=0,
                               size_divisibility=config.data.size_divisibility)
    example = next(iter(loader)).images.contiguous()
    STATIC = example.shape[0]
    files = quantize.calibration_files("train", config, args.calibration_images)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # static shapes: with a dynamic batch, size nodes read convolution outputs and the
        # quantizer's partitions get a second output
        exported = torch.export.export(Levels(), (example,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        calibration = [torch.from_numpy(images) for images in quantize.calibration_batches(detector, files)]
        for start in range(0, len(calibration) - STATIC + 1, STATIC):
            prepared(torch.cat(calibration[start:start + STATIC]))
        converted = convert_pt2e(prepared)
        torch._inductor.config.freezing = True
        int8 = Detector(Quantized(torch.compile(converted)), transform=detector.transform,
                        postprocessor=detector.postprocessor, size_divisibility=config.data.size_divisibility,
                        class_names=detector.class_names, channels_last=False)
        fp32 = Detector.from_checkpoint(args.weights, ["model.compile_inference=true"], device="cpu")
        predictors = {"float32, compiled": fp32.predict_batch, "PT2E INT8, compiled": int8.predict_batch,
                      "ONNX Runtime INT8": _onnx_predictor(export.onnx_session(args.onnx_int8), export)}
        evaluator = build_evaluator(config, dataset, output_dir=None)
        evaluator.loader = loader
        rows = []
        for name, predict in predictors.items():  # accuracy, and the compilation warm-up
            metrics = evaluator(predict, log=lambda line: None)["metrics"]
            rows.append({"path": name, "mAP": 100 * metrics["AP"], "AP50": 100 * metrics["AP50"],
                         "images_per_s": max(_throughput(predict, loader) for _ in range(args.rounds))})
            print(f"{name}: mAP {rows[-1]['mAP']:.2f}, {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    document = {"date": datetime.date.today().isoformat(), "machine": _machine(torch),
                "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                "eval_batch_size": config.eval.batch_size, "val_images": len(dataset), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
