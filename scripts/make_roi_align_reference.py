"""Build ``tests/data/mmcv_roi_align_reference.pt``: mmcv's own ``RoIAlign`` forward and backward on edge cases.

mmdetection 2.x's two-stage detectors pool their region features with mmcv's ``RoIAlign(output_size,
spatial_scale, sampling_ratio=0, aligned=True)`` (``pool_mode='avg'``, ``mmcv/ops/roi_align.py`` over the C++
CPU kernel ``csrc/pytorch/cpu/roi_align.cpp``), and build their mask targets with the same kernel on the binary
ground-truth masks (``BitmapMasks.crop_and_resize``: uint8 0/1 masks cast to float, ``spatial_scale`` 1.0,
output 28, then ``>= 0.5``). gradlens uses ``torchvision.ops.roi_align(..., sampling_ratio=0, aligned=True)``
for both; this script records what the upstream kernel gives, so the tests can hold torchvision to it. It runs
mmcv 1.7.2's Python ``RoIAlign`` (installed without compiled ops) over its C++ CPU kernel compiled from the mmcv
source tree and registered as ``mmcv._ext`` (``scripts/mmcv_ext.py``, as ``scripts/compare_two_stage_with_fork.py``
does), and records, all float32:

* ``feats[name]``: random N(0, 1) feature maps ``(2, 8, H, W)``: ``"a"`` 25x38, ``"b"`` 13x19;
* ``cases[name] = {"feat", "channels", "output_size", "spatial_scale", "rois", "grad_output", "output",
  "grad_input"}``: ``feat`` names the map and ``channels`` how many of its leading channels the case pools
  (``feats[feat][:, :channels]``: 4 at output 7, 2 at 14, 1 at 28, to keep the file under 1 MiB); ``rois`` ``(K, 5)``
  ``(batch index, x1, y1, x2, y2)`` in image pixels (feature pixels / ``spatial_scale``); ``output`` ``(K, C, S,
  S)`` is mmcv's forward; ``grad_output`` (same shape; values k/64, |k| <= 127, exact in float16 and float32)
  a fixed random upstream gradient and ``grad_input`` (the shape of the pooled feature slice) mmcv's backward
  for it. The rois, the same for every case up to the scale: boxes inside the map on both images, boxes partly
  outside (left/top and right/bottom), boxes entirely outside (beyond the -1 border: zeros), boxes below one
  feature pixel, huge boxes (3x the map) and the whole map, boxes on exact integer and half-integer feature
  coordinates (pixel borders and, with ``aligned``'s -0.5 shift, pixel centres), zero-width, zero-height and
  zero-size boxes, a box ending exactly on the far border. Cases: every spatial scale 1/4, 1/8, 1/16, 1 on
  both maps, with output sizes 7, 14, 28 spread over them;
* ``mask``: ``{"masks"`` uint8 ``(M, 60, 90)`` 0/1 rectangles and ellipses, ``"inds"`` int64 ``(P,)`` the mask of
  each proposal, ``"bboxes"`` float32 ``(P, 4)`` proposals clipped to the mask as ``mask_target_single`` does,
  ``"output"`` float32 ``(P, 28, 28)`` = ``roi_align(masks[inds][:, None].float(), [arange(P), bboxes], 28,
  1.0, 0, 'avg', True)``, ``"target"`` bool ``(P, 28, 28)`` = mmdet's ``BitmapMasks.crop_and_resize(bboxes,
  (28, 28), inds)`` (``output >= 0.5``)``}``;
* ``mmcv_version``, ``torch_version``, ``mmdet_version``.

Run in the fork's virtual environment (see ``scripts/compare_with_fork.py`` for its setup)::

    PYTHONPATH=/work/main /tmp/forkcmp/venv/bin/python scripts/make_roi_align_reference.py \\
        --mmcv-src /tmp/forkcmp/mmcv-src --build /tmp/forkcmp/build-ext --out tests/data/mmcv_roi_align_reference.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

FEATS = {"a": (25, 38), "b": (13, 19)}
CHANNELS = {7: 4, 14: 2, 28: 1}  # leading channels pooled per output size (file size)
# (feature map, spatial scale, output size): every scale on both maps, every output size at least twice
CASES = [("a", 1 / 4, 7), ("a", 1 / 8, 14), ("a", 1 / 16, 28), ("a", 1.0, 7),
         ("b", 1 / 4, 28), ("b", 1 / 8, 7), ("b", 1 / 16, 14), ("b", 1.0, 14)]


def edge_case_rois(generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """``(K, 5)`` rois in feature pixels (batch index, x1, y1, x2, y2), float32."""
    h, w = float(height), float(width)
    boxes = [
        (0, 2.3, 1.7, 17.9, 10.2), (1, 5.1, 3.3, 12.6, 11.4),  # inside, both images
        (0, -3.3, -2.7, 6.2, 5.1), (1, w - 4.4, h - 3.6, w + 5.5, h + 2.2),  # partly outside
        (0, w + 2.0, h + 2.0, w + 6.0, h + 5.0), (1, -8.0, -8.0, -2.0, -2.0),  # entirely outside (zeros)
        (0, 10.3, 7.6, 10.8, 7.9), (1, 0.1, 0.1, 0.4, 0.6), (0, 3.25, 4.75, 3.5, 5.0),  # below one pixel
        (1, -w, -h, 2 * w, 2 * h), (0, 0.0, 0.0, w, h),  # huge, the whole map
        (0, 3.0, 2.0, 11.0, 9.0), (1, 3.5, 2.5, 11.5, 9.5), (1, 0.5, 0.5, 7.5, 7.5),  # integer / half-integer
        (0, 5.0, 3.0, 5.0, 10.0), (1, 4.0, 6.0, 12.0, 6.0), (0, 7.0, 7.0, 7.0, 7.0),  # zero width / height / size
        (1, w - 1.0, h - 1.0, w, h), (0, w - 6.5, 0.0, w, 4.0),  # ending on the far border
    ]
    rois = torch.tensor(boxes, dtype=torch.float32)
    # a few ordinary random boxes on both images
    xy = torch.rand(5, 2, generator=generator) * torch.tensor([w, h]) * 0.8
    wh = 0.5 + torch.rand(5, 2, generator=generator) * torch.tensor([w, h]) * 0.5
    rand = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0]]), xy, xy + wh], 1)
    return torch.cat([rois, rand.float()], 0)


def to_image_pixels(rois: torch.Tensor, spatial_scale: float) -> torch.Tensor:
    """Feature-pixel rois to image pixels (the scales are powers of two: exact)."""
    out = rois.clone()
    out[:, 1:] = rois[:, 1:] / spatial_scale
    return out


def binary_masks(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    """uint8 0/1 masks: rectangles (even) and ellipses (odd)."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    masks = torch.zeros(count, height, width, dtype=torch.uint8)
    for k in range(count):
        cx, cy = (torch.rand(2, generator=generator) * torch.tensor([width, height])).tolist()
        rx, ry = (3 + torch.rand(2, generator=generator) * torch.tensor([width, height]) * 0.3).tolist()
        if k % 2 == 0:
            inside = ((xx - cx).abs() <= rx) & ((yy - cy).abs() <= ry)
        else:
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        masks[k] = inside.to(torch.uint8)
    return masks


def mask_case(generator: torch.Generator) -> dict:
    """mmdet's mask-target use: ``BitmapMasks.crop_and_resize`` of proposals assigned to gt masks."""
    import numpy as np
    from mmcv.ops import roi_align
    from mmdet.core import BitmapMasks

    height, width, count = 60, 90, 6
    masks = binary_masks(generator, count, height, width)
    # proposals: around each mask's box, jittered; plus edge cases (outside, tiny, border, degenerate)
    boxes, inds = [], []
    for k in range(count):
        ys, xs = torch.nonzero(masks[k], as_tuple=True)
        box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        for _ in range(3):
            size = (box[2:] - box[:2]).repeat(2)
            boxes.append(box + (torch.rand(4, generator=generator) - 0.5) * 0.4 * size)
            inds.append(k)
    extra = [(-5.0, -4.0, 30.0, 25.0), (70.0, 40.0, 100.0, 70.0), (10.2, 10.4, 10.7, 10.9), (0.0, 0.0, 90.0, 60.0),
             (12.0, 8.0, 40.0, 36.0), (12.5, 8.5, 40.5, 36.5), (20.0, 5.0, 20.0, 30.0), (89.0, 59.0, 90.0, 60.0)]
    for j, box in enumerate(extra):
        boxes.append(torch.tensor(box))
        inds.append(j % count)
    bboxes = torch.stack(boxes).float().numpy()
    bboxes[:, [0, 2]] = np.clip(bboxes[:, [0, 2]], 0, width)  # mask_target_single's clipping
    bboxes[:, [1, 3]] = np.clip(bboxes[:, [1, 3]], 0, height)
    inds = np.array(inds, dtype=np.int64)
    target = BitmapMasks(masks.numpy(), height, width).crop_and_resize(bboxes, (28, 28), inds, device="cpu")
    bboxes_t, inds_t = torch.from_numpy(bboxes), torch.from_numpy(inds)
    rois = torch.cat([torch.arange(len(bboxes_t), dtype=torch.float32)[:, None], bboxes_t], 1)
    output = roi_align(masks[inds_t][:, None].float(), rois, (28, 28), 1.0, 0, "avg", True).squeeze(1)
    target = torch.from_numpy(target.to_ndarray()).bool()
    assert torch.equal(target, output >= 0.5)
    return {"masks": masks, "inds": inds_t, "bboxes": bboxes_t, "output": output, "target": target}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mmcv-src", type=Path, required=True, help="an mmcv v1.7.2 source tree")
    parser.add_argument("--build", type=Path, required=True, help="folder for the compiled kernels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from mmcv_ext import register_mmcv_ext

    register_mmcv_ext(args.mmcv_src, args.build)
    from mmcv.ops import RoIAlign

    generator = torch.Generator().manual_seed(0)
    feats = {name: torch.randn(2, 8, h, w, generator=generator) for name, (h, w) in FEATS.items()}
    cases = {}
    for feat, scale, size in CASES:
        h, w = FEATS[feat]
        channels = CHANNELS[size]
        rois = to_image_pixels(edge_case_rois(generator, h, w), scale)
        x = feats[feat][:, :channels].contiguous().requires_grad_(True)
        output = RoIAlign(size, scale, sampling_ratio=0, pool_mode="avg", aligned=True)(x, rois)
        grad_output = torch.randint(-127, 128, output.shape, generator=generator).float() / 64
        (grad_input,) = torch.autograd.grad(output, x, grad_output)
        name = f"{feat}_s{round(1 / scale)}_o{size}"
        cases[name] = {"feat": feat, "channels": channels, "output_size": size, "spatial_scale": scale,
                       "rois": rois, "grad_output": grad_output, "output": output.detach(), "grad_input": grad_input}
        print(f"{name}: {len(rois)} rois, output {tuple(output.shape)}, "
              f"{int((output.abs().flatten(1).amax(1) == 0).sum())} all-zero rois")
    mask = mask_case(generator)
    print(f"mask: {len(mask['inds'])} proposals over {len(mask['masks'])} masks, "
          f"{int(mask['target'].sum())} target pixels")
    import mmcv
    import mmdet

    torch.save({"mmcv_version": str(mmcv.__version__), "torch_version": str(torch.__version__),
                "mmdet_version": str(mmdet.__version__), "feats": feats, "cases": cases, "mask": mask}, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
