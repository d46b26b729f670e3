"""Ours against torchvision's RetinaNet at the same shapes and precision, as ratios.

    python scripts/benchmark.py                      # all cases, on CUDA if present, else CPU
    python scripts/benchmark.py --cases focal post   # some of them
    python scripts/benchmark.py --cases step@scratch --rounds 1   # one row
    python scripts/benchmark.py --json runs/benchmark.json --repeats 7

Cases (float32 on both sides):
  focal   sigmoid focal loss forward + backward at RetinaNet scale, 2 x 76725 anchors x 80 classes
          (torchvision: its sigmoid_focal_loss on one-hot targets; ours: integer class targets),
          with our default kernel ("auto": Triton on CUDA; at this size torch.compile on CPU,
          whose one-time compilation is in the warm-up) and, as focal@eager, with the pure-torch
          kernel. On CUDA it also prints our device time (CUDA graph replay, no Python) over
          the floor for any kernel: one read of the logits and one write of the gradient at the
          bandwidth of a large device-to-device copy.
  match   matching + loss for 8 images with 50 boxes each (torchvision: RetinaNet.compute_loss);
          match@eager with loss.cls.kernel=eager
  post    postprocessing of 2 images at score threshold 0.0 and 0.05
  step    one training step of R50-FPN at 512 x 512, batch 2 (forward, loss, backward, SGD),
          both sides set up as their COCO recipes train from ImageNet weights: FrozenBatchNorm,
          stem and res2 / layer1 frozen (ours: configs/retinanet_R50_FPN_1x_coco.yaml, which
          also folds FrozenBN into the convolutions and takes P6 from C5; torchvision:
          FrozenBatchNorm2d with trainable_backbone_layers=3, which retinanet_resnet50_fpn
          only picks when given backbone weights, so it is assembled here); weights random.
          step@scratch: trainable BatchNorm, every stage trainable, on both sides (torchvision's
          retinanet_resnet50_fpn without weights; ours with model.backbone.norm=bn,
          model.backbone.freeze_at=0). Each step row requires both sides to train the same
          number of backbone parameters and prints it
  infer   inference of the same model, batch 2, postprocessing included; infer@compile with
          model.compile_inference=true (torch.compile, weights frozen; compiled in the warm-up);
          infer@winograd adds model.winograd=true (CPU: 3x3 convolutions by Winograd F(2x2, 3x3))
          step@amp / infer@amp: ours under autocast (bfloat16 on CPU, float16 on CUDA) against
          torchvision in float32: not the same precision, reported apart

Every measurement runs in a fresh subprocess (so one case's allocations cannot slow another),
takes the median of --repeats timed runs after a warm-up, is repeated --rounds times alternating
torchvision and ours (each side keeps its best median: a shared VM has slow spells that would
otherwise land on one side only), and reports the peak extra memory of
the timed runs (CUDA: max_memory_allocated above what is allocated before them; CPU: peak RSS
above the RSS before them, after returning freed heap pages to the OS; Linux only). Ratios are
torchvision / ours: higher means we are faster or use less. On CPU VMs whose glibc returns freed
blocks to the OS, big-tensor timings swing; run it twice, once with
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 in the environment, and compare.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("focal", "match", "post", "step", "infer")
ROWS = {"focal": ["focal", "focal@eager"], "match": ["match", "match@eager"],
        "post": ["post@0.0", "post@0.05"], "step": ["step", "step@scratch", "step@amp"],
        "infer": ["infer", "infer@compile", "infer@winograd", "infer@amp"]}
NUM_ANCHORS = 76725  # RetinaNet's anchors for an 800 x 1216 input (torchvision's stride rule)


# ------------------------------------------------------------------------------------------------
# One measurement (runs in its own process)
# ------------------------------------------------------------------------------------------------
def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_cpu_peak() -> int:
    """Returns freed heap pages to the OS and restarts the peak-RSS count (Linux); -> current RSS
    in bytes, the baseline against which the next peak is read."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _proc_status_kb("VmRSS") * 1024


def _measure(fn, device, repeats: int) -> dict:
    import torch
    fn()  # warm-up: caches, allocator, lazy init, compilation
    _sync(device)
    # Peak memory of the timed calls above what lives between calls (inputs, model); one-time
    # costs of the warm-up (thread pools, torch.compile) are not counted.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else \
        max(0, _proc_status_kb("VmHWM") * 1024 - base)
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_extra_bytes": peak}


def focal_inputs(device, seed: int = 0):
    """Logits (2 x 76725, 80) float32 and classes (2 x 76725,) in 0..80, 97 % of them 80
    (background, as in training), on `device`."""
    import torch
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * NUM_ANCHORS, 80, generator=g)
    classes = torch.randint(0, 81, (2 * NUM_ANCHORS,), generator=g)
    classes[torch.rand(2 * NUM_ANCHORS, generator=g) < 0.97] = 80
    return logits.to(device), classes.to(device)


def _focal(impl: str, device, kernel: str = "auto"):
    import torch
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    from retinanet.losses.focal import sigmoid_focal_loss_with_classes
    logits, classes = focal_inputs(device)
    logits.requires_grad_()

    def ours():
        loss = sigmoid_focal_loss_with_classes(logits, classes, kernel=kernel)
        loss.backward()
        logits.grad = None

    def torchvision():
        one_hot = torch.zeros_like(logits)
        fg = classes < 80
        one_hot[fg, classes[fg]] = 1.0
        loss = tv_focal(logits, one_hot, reduction="sum")
        loss.backward()
        logits.grad = None
    return ours if impl == "ours" else torchvision


def _targets(device, num_images: int, num_boxes: int, size: int = 512):
    import torch
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(num_images):
        xy = torch.rand(num_boxes, 2, generator=g) * (size - 64)
        wh = 8 + torch.rand(num_boxes, 2, generator=g) * 200
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
        out.append({"boxes": boxes.to(device), "labels": torch.randint(1, 91, (num_boxes,), generator=g).to(device)})
    return out


def _tv_model(device, recipe: bool = False):
    """torchvision's RetinaNet R50-FPN v1, 91 classes, at 512 x 512, random weights.

    recipe=False: as retinanet_resnet50_fpn builds it without weights (trainable BatchNorm2d,
    all five backbone stages trainable). recipe=True: as its COCO recipe trains it
    (weights_backbone=ImageNet): FrozenBatchNorm2d and trainable_backbone_layers=3 (stem and
    layer1 frozen). retinanet_resnet50_fpn chooses both from whether weights_backbone is set
    (None here: nothing is downloaded) and takes no norm_layer, so that model is assembled
    here as it assembles it."""
    import torch
    from torchvision.models import resnet50
    from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    torch.manual_seed(0)
    if not recipe:
        model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                       min_size=512, max_size=512)
    else:
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3,
                                         returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        model = RetinaNet(backbone, 91, min_size=512, max_size=512)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return model.to(device)


def _our_model(device, num_classes: int = 91, scratch: bool = False):
    """Ours, R50-FPN 1x COCO config at 512 x 512: FrozenBN, stem + res2 frozen (freeze_at=2);
    scratch=True: trainable BatchNorm, no stage frozen."""
    import torch

    from retinanet.config import load_config
    from retinanet.model import build_model, use_fast_memory_format
    torch.manual_seed(0)
    overrides = ["data.test_min_size=512", "data.test_max_size=512", "data.size_divisibility=128"]
    if scratch:
        overrides += ["model.backbone.norm=bn", "model.backbone.freeze_at=0"]
    cfg = load_config(ROOT / "configs/retinanet_R50_FPN_1x_coco.yaml", overrides)
    model = build_model(cfg.model, num_classes, load_backbone_weights=False)
    return cfg, use_fast_memory_format(model.to(device), device)


def _trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _match(impl: str, device, kernel: str = "auto"):
    import torch
    targets = _targets(device, 8, 50, size=800)
    g = torch.Generator().manual_seed(2)
    num_anchors = NUM_ANCHORS
    if impl == "torchvision":
        model = _tv_model(device)
        from torchvision.models.detection.image_list import ImageList
        images = ImageList(torch.zeros(8, 3, 800, 1216, device=device), [(800, 1216)] * 8)
        features = [torch.zeros(8, 256, 800 // s, 1216 // s, device=device) for s in (8, 16, 32, 64, 128)]
        anchors = model.anchor_generator(images, features)
        num_anchors = anchors[0].shape[0]
        cls = torch.randn(8, num_anchors, 91, generator=g).to(device).requires_grad_()
        reg = torch.randn(8, num_anchors, 4, generator=g).to(device).requires_grad_()

        def run():
            losses = model.compute_loss(targets, {"cls_logits": cls, "bbox_regression": reg}, anchors)
            sum(losses.values()).backward()
            cls.grad = reg.grad = None
        return run
    from retinanet.config import load_config
    from retinanet.losses import build_criterion
    cfg = load_config(ROOT / "configs/torchvision/retinanet_resnet50_fpn.yaml", [f"loss.cls.kernel={kernel}"])
    criterion = build_criterion(cfg, 91, None, device=device).to(device)
    from retinanet.model import build_anchor_generator
    sizes = [(-(-800 // s), -(-1216 // s)) for s in (8, 16, 32, 64, 128)]
    anchors = build_anchor_generator(cfg.model.anchors)(sizes, device, image_size=(800, 1216))
    cls = torch.randn(8, anchors.shape[0], 91, generator=g).to(device).requires_grad_()
    reg = torch.randn(8, anchors.shape[0], 4, generator=g).to(device).requires_grad_()
    boxes = [t["boxes"] for t in targets]
    labels = [t["labels"] for t in targets]

    def run():
        losses = criterion(cls, reg, anchors, boxes, labels)
        (losses["loss_cls"] + losses["loss_box"]).backward()
        cls.grad = reg.grad = None
    return run


def _post(impl: str, device, score_thresh: float):
    import torch
    g = torch.Generator().manual_seed(3)
    sizes = [(64, 96), (32, 48), (16, 24), (8, 12), (4, 6)]  # a 512 x 768 input
    counts = [h * w * 9 for h, w in sizes]
    cls = (torch.randn(2, sum(counts), 91, generator=g) * 2 - 3).to(device)
    reg = (torch.randn(2, sum(counts), 4, generator=g) * 0.2).to(device)
    if impl == "torchvision":
        model = _tv_model(device).eval()
        model.score_thresh = score_thresh
        from torchvision.models.detection.image_list import ImageList
        images = ImageList(torch.zeros(2, 3, 512, 768, device=device), [(512, 768)] * 2)
        features = [torch.zeros(2, 256, h, w, device=device) for h, w in sizes]
        anchors = model.anchor_generator(images, features)
        split = {"cls_logits": list(cls.split(counts, dim=1)), "bbox_regression": list(reg.split(counts, dim=1))}
        split_anchors = [list(a.split(counts)) for a in anchors]
        return lambda: model.postprocess_detections(split, split_anchors, images.image_sizes)
    from retinanet.boxes import BoxCoder
    from retinanet.model import AnchorGenerator
    from retinanet.predictor import PostProcessor
    anchors = AnchorGenerator(sizes=[32, 64, 128, 256, 512], octave_scales=[1, 2 ** (1 / 3), 2 ** (2 / 3)],
                              aspect_ratios=[0.5, 1, 2], strides=[8, 16, 32, 64, 128])(sizes, device)
    post = PostProcessor(box_coder=BoxCoder(), score_thresh=score_thresh, topk_candidates=1000,
                         nms_thresh=0.5, max_detections=300)
    return lambda: post(cls, reg, anchors, counts, [(512, 768)] * 2)


def _autocast(device, enabled: bool):
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                          enabled=enabled)


def _step(impl: str, device, amp: bool = False, scratch: bool = False):
    """One SGD step of both models set up alike: the COCO recipes' FrozenBN backbone with stem and
    res2 frozen or, scratch=True, trainable BatchNorm and every stage trainable. The returned
    function carries the number of trainable backbone parameters, which the driver requires
    to be the same on both sides."""
    import torch
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(4)).to(device)
    targets = _targets(device, 2, 10)
    if impl == "torchvision":
        model = _tv_model(device, recipe=not scratch).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

        def run():
            losses = model(list(images), targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
        run.backbone_trainable = _trainable(model.backbone.body)
        return run
    from retinanet.losses import build_criterion
    cfg, model = _our_model(device, scratch=scratch)
    model.train()
    criterion = build_criterion(cfg, 91, None, device=device).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    mean = torch.tensor(cfg.data.mean, device=device)[:, None, None]
    std = torch.tensor(cfg.data.std, device=device)[:, None, None]
    boxes = [t["boxes"] for t in targets]
    labels = [t["labels"] - 1 for t in targets]

    def run():
        with _autocast(device, amp):
            out = model((images - mean) / std)
        losses = criterion(out.cls_logits.float(), out.box_deltas.float(), out.anchors, boxes, labels)
        optimizer.zero_grad(set_to_none=True)
        (losses["loss_cls"] + losses["loss_box"]).backward()
        optimizer.step()
    run.backbone_trainable = _trainable(model.backbone)
    return run


def _infer(impl: str, device, amp: bool = False, compile: bool = False, winograd: bool = False):
    import torch
    images = list(torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(5)).to(device))
    if impl == "torchvision":
        model = _tv_model(device).eval()
        return lambda: model(images)
    from retinanet import Detector
    from retinanet.config import load_config
    cfg = load_config(ROOT / "configs/retinanet_R50_FPN_1x_coco.yaml",
                      ["data.test_min_size=512", "data.test_max_size=512", "model.num_classes=91",
                       "data.val.annotations=", "data.train.annotations=",
                       f"model.compile_inference={str(compile).lower()}",
                       f"model.winograd={str(winograd).lower()}"])
    torch.manual_seed(0)
    detector = Detector.from_config(cfg, device=str(device))

    def run():
        with _autocast(device, amp):
            return detector.predict(images)
    return run


def graph_seconds(fn, repeats: int, replays: int = 10) -> float:
    """Device time of fn's kernels alone, without Python or launch overhead: fn captured in a
    CUDA graph (after a warm-up on a side stream, as torch.cuda.graph requires), replayed back to
    back between CUDA events; the median over `repeats` of the time per replay."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / replays)
    return statistics.median(times[1:])


def copy_bandwidth(device, repeats: int) -> float:
    """Bytes a second that the GPU moves in a 1 GiB device-to-device copy, counting bytes read
    and bytes written: the memory ceiling that floors are measured against."""
    import torch
    src = torch.empty(2 ** 28, device=device).normal_()  # 1 GiB of float32, never zeros
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / graph_seconds(lambda: dst.copy_(src), repeats)


def _focal_floor(device, repeats: int) -> dict:
    """Our focal forward + backward in device time against its floor: one read of the float32
    logits and one write of the gradient (2 x 76725 x 80 x 4 bytes each) at the bandwidth of a
    1 GiB device-to-device copy (bytes read + bytes written over its time). The loss runs over
    four sets of logits in turn, 197 MB together, so that no set is still in L2 (50 MB on an
    H100) from its last pass."""
    import torch
    sets = [_focal("ours", device) for _ in range(4)]

    def all_sets():
        for fn in sets:
            fn()
    focal_s = graph_seconds(all_sets, repeats) / len(sets)
    bandwidth = copy_bandwidth(device, repeats)
    floor_s = 2 * (2 * NUM_ANCHORS * 80 * 4) / bandwidth
    return {"kernel_s": focal_s, "floor_s": floor_s, "bandwidth_gbs": bandwidth / 1e9}


def run_one(case: str, impl: str, repeats: int) -> dict:
    import torch
    torch.set_grad_enabled(case.split("@")[0] in ("focal", "match", "step"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if case.startswith("post"):
        fn = _post(impl, device, float(case.split("@")[1]))
    elif case.startswith(("focal", "match")):
        kernel = case.split("@")[1] if "@" in case else "auto"
        fn = (_focal if case.startswith("focal") else _match)(impl, device, kernel)
    else:  # step, infer; @amp: ours under autocast (bfloat16 on CPU, float16 on CUDA)
        name, _, variant = case.partition("@")
        amp = variant == "amp" and impl == "ours"
        fn = _step(impl, device, amp, scratch=variant == "scratch") if name == "step" else \
            _infer(impl, device, amp, compile=variant in ("compile", "winograd") and impl == "ours",
                   winograd=variant == "winograd" and impl == "ours")
    result = _measure(fn, device, repeats)
    if hasattr(fn, "backbone_trainable"):
        result["backbone_trainable"] = fn.backbone_trainable
    if case == "focal" and impl == "ours" and device.type == "cuda":
        result.update(_focal_floor(device, repeats))
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result["threads"] = torch.get_num_threads()
    return result


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES),
                        choices=list(dict.fromkeys([*CASES, *(r for rows in ROWS.values() for r in rows)])),
                        help="cases (each with its rows), or single rows such as step@scratch")
    parser.add_argument("--skip", nargs="*", default=[], metavar="ROW",
                        help="rows to leave out, e.g. step@amp infer@winograd (minutes each on a 2-core CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="fresh processes per side, alternating; each side keeps its best median")
    parser.add_argument("--json", default="runs/benchmark.json")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement, printed as json
        print(json.dumps(run_one(args.one[0], args.one[1], args.repeats)))
        return 0
    rows = []
    for case in args.cases:
        for sub in [row for row in ROWS.get(case, [case]) if row not in args.skip]:
            measured = {}
            for _ in range(args.rounds):
                for impl in ("torchvision", "ours"):
                    proc = subprocess.run([sys.executable, __file__, "--one", sub, impl, "--repeats",
                                           str(args.repeats)], capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode != 0:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    if impl not in measured or result["median_s"] < measured[impl]["median_s"]:
                        measured[impl] = result
            tv, ours = measured["torchvision"], measured["ours"]
            if tv.get("backbone_trainable") != ours.get("backbone_trainable"):
                print(f"{sub}: the two sides train different backbones: torchvision "
                      f"{tv['backbone_trainable']} trainable parameters, ours "
                      f"{ours['backbone_trainable']}", file=sys.stderr)
                return 1
            row = {"case": sub, "torchvision_ms": 1000 * tv["median_s"], "ours_ms": 1000 * ours["median_s"],
                   "speed_ratio": tv["median_s"] / ours["median_s"],
                   "torchvision_peak_mb": tv["peak_extra_bytes"] / 2**20,
                   "ours_peak_mb": ours["peak_extra_bytes"] / 2**20,
                   "memory_ratio": tv["peak_extra_bytes"] / max(ours["peak_extra_bytes"], 1),
                   "device": ours["device"], "threads": ours["threads"]}
            if "backbone_trainable" in ours:
                row["backbone_trainable"] = ours["backbone_trainable"]
            if "floor_s" in ours:
                row.update(ours_kernel_ms=1000 * ours["kernel_s"], floor_ms=1000 * ours["floor_s"],
                           bandwidth_gbs=ours["bandwidth_gbs"],
                           ours_over_floor=ours["kernel_s"] / ours["floor_s"])
                print(f"focal fwd+bwd device time {row['ours_kernel_ms'] * 1000:.1f} us (CUDA graph) "
                      f"over one read of the logits + one write of the gradient at "
                      f"{row['bandwidth_gbs']:.0f} GB/s ({row['floor_ms'] * 1000:.1f} us): "
                      f"x{row['ours_over_floor']:.2f}", flush=True)
            rows.append(row)
            print(f"{sub:<10} torchvision {row['torchvision_ms']:9.1f} ms  ours {row['ours_ms']:9.1f} ms  "
                  f"speed x{row['speed_ratio']:5.2f}   peak extra {row['torchvision_peak_mb']:8.1f} MB vs "
                  f"{row['ours_peak_mb']:8.1f} MB  (x{row['memory_ratio']:.1f})"
                  + (f"  trainable backbone params {row['backbone_trainable']:,} on both sides"
                     if "backbone_trainable" in row else ""), flush=True)
    print()
    print("| case | torchvision ms | ours ms | speed ratio | tv peak MB | ours peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['torchvision_ms']:.1f} | {r['ours_ms']:.1f} | {r['speed_ratio']:.2f} | "
              f"{r['torchvision_peak_mb']:.1f} | {r['ours_peak_mb']:.1f} | {r['memory_ratio']:.1f} |")
    env = {k: os.environ[k] for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "malloc_env": env, "repeats": args.repeats,
                                           "rounds": args.rounds}, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
