"""Write synthetic mmdetection 2.x checkpoints of the CEDNet paper's RetinaNet configurations.

No released weights can be downloaded here, so this builds, for every
configuration, a checkpoint laid out exactly as the fork's mmdetection saves
one: ``{"meta": {"mmdet_version", "CLASSES", "config", ...}, "state_dict": ...}``
with the official parameter names (``backbone.*`` as the fork's backbone
modules name them — the tests hold gradlens' backbones to the official key
lists — ``neck.lateral_convs.N.conv.*``, ``neck.fpn_convs.N.conv.*``,
``bbox_head.cls_convs.N.conv.*``, ``bbox_head.retina_cls.*``...), including the
buffers a real checkpoint carries (Swin's ``relative_position_index``, batch
norm's ``num_batches_tracked``). Weights are random (seeded); the classifier
bias is raised so that random weights still produce detections to compare.

Beside each ``<config>.pth`` it writes ``<config>.gradlens.pth``, the same
weights in gradlens' own format, so the conversion can be checked end to end:

    python scripts/make_mmdet_checkpoints.py --out /tmp/mmdet-ckpts [--config retinanet_cednet_next_tiny ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from gradlens.models.formats.checkpoints import save_detector
from gradlens.models.formats.mmdet import coco80_categories, to_mmdet
from gradlens.models.registry import build_detector

# The backbone part of each configuration's config text (the fork's configs under ced-mmdet/configs/cednet/).
BACKBONE_CONFIGS = {
    "cednet_next_tiny": "type='CEDNetWrapper', num_stages=3, encoder_type='Encoder', decoder_type='Decoder', "
                        "p2_dim=96, p2_block=3, dims=[192, 352, 512], blocks=[2, 4, 2], out_chans=256, num_add_blocks=2",
    "cednet_next_small": "type='CEDNetWrapper', num_stages=4, encoder_type='Encoder', decoder_type='Decoder', "
                         "p2_dim=96, p2_block=3, dims=[192, 352, 512], blocks=[2, 7, 2], out_chans=256, num_add_blocks=2",
    "cednet_next_base": "type='CEDNetWrapper', num_stages=4, encoder_type='Encoder', decoder_type='Decoder', "
                        "p2_dim=128, p2_block=3, dims=[256, 448, 704], blocks=[2, 7, 2], out_chans=256, num_add_blocks=2",
    # the fork's other CEDNetWrapper RetinaNets (configs/cednet/{resnet,swin,cswin}/retinanet_ced_*)
    "ced_resnet_50": "type='CEDNetWrapper', in_chans=3, num_stages=3, encoder_type='Encoder', decoder_type='Decoder', "
                     "base_block='Bottleneck', focal_block='DBottleneck', p2_dim=64, p2_block=3, dims=[128, 256, 384], "
                     "blocks=[1, 4, 2], out_chans=256, num_add_blocks=2, layer_scale_init_value=1e-6, drop_path_rate=0., "
                     "norm_cfg=dict(type='SyncBN', requires_grad=True), act_type='relu'",
    "ced_swin_tiny": "type='CEDNetWrapper', in_chans=3, num_stages=3, encoder_type='Encoder', decoder_type='Decoder', "
                     "base_block='SwinBlock', focal_block='DSwinBlock', p2_dim=96, p2_block=3, dims=[160, 288, 416], "
                     "blocks=[2, 4, 2], out_chans=256, num_add_blocks=2, layer_scale_init_value=1e-6, drop_path_rate=0.1, "
                     "norm_cfg=dict(type='LN', eps=1e-6, data_format='channels_first'), act_type='gelu'",
    "ced_cswin_tiny": "type='CEDNetWrapper', in_chans=3, num_stages=3, encoder_type='CSwinEncoder', decoder_type='Decoder', "
                      "base_block='CSwinBlock', focal_block='CSwinBlock', p2_dim=64, p2_block=3, dims=[128, 256, 320], "
                      "blocks=[2, 8, 1], out_chans=256, num_add_blocks=2, layer_scale_init_value=1.0, drop_path_rate=0.2, "
                      "norm_cfg=dict(type='LN', eps=1e-6, data_format='channels_first'), act_type='gelu'",
    # the fork's CSWin-T RetinaNet (configs/cednet/cswin/retinanet_cswin_tiny_patch4_window7_…)
    "cswin_tiny": "type='CSwinTransformer', embed_dim=64, depth=[1, 2, 21, 1], num_heads=[2, 4, 8, 16], "
                  "split_size=[1, 2, 7, 7], mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_path_rate=0.1, use_chk=False, "
                  "out_indices=[0, 1, 2, 3]",
    "convnext_tiny": "type='ConvNeXt', in_chans=3, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], "
                     "drop_path_rate=0.4, layer_scale_init_value=1.0, out_indices=[1, 2, 3]",
    "convnext_small": "type='ConvNeXt', in_chans=3, depths=[3, 3, 27, 3], dims=[96, 192, 384, 768], "
                      "drop_path_rate=0.6, layer_scale_init_value=1.0, out_indices=[0, 1, 2, 3]",
    "convnext_base": "type='ConvNeXt', in_chans=3, depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024], "
                     "drop_path_rate=0.7, layer_scale_init_value=1.0, out_indices=[0, 1, 2, 3]",
    "swin_tiny": "type='SwinTransformer', embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, "
                 "out_indices=(1, 2, 3)",
    "swin_small": "type='SwinTransformer', embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, "
                  "out_indices=(1, 2, 3)",
    "swin_base": "type='SwinTransformer', embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, "
                 "out_indices=(1, 2, 3)",
    # HRNet-W32: mmdetection's HRNet with configs/hrnet/*hrnetv2p_w32*'s extra, under an FPN on its last three branches
    "hrnet_w32": "type='HRNet', extra=dict("
                 "stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(4, ), num_channels=(64, )), "
                 "stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(4, 4), num_channels=(32, 64)), "
                 "stage3=dict(num_modules=4, num_branches=3, block='BASIC', num_blocks=(4, 4, 4), num_channels=(32, 64, 128)), "
                 "stage4=dict(num_modules=3, num_branches=4, block='BASIC', num_blocks=(4, 4, 4, 4), "
                 "num_channels=(32, 64, 128, 256)))",
    # FocalNet: the official detection/configs/focalnet/mask_rcnn_focalnet_*_1x_coco_{srf,lrf}.py (T, S: SRF; B: LRF)
    "focalnet_tiny": "type='FocalNet', embed_dim=96, depths=[2, 2, 6, 2], mlp_ratio=4.0, drop_path_rate=0.1, patch_norm=True, "
                     "focal_windows=[9, 9, 9, 9], focal_levels=[2, 2, 2, 2], out_indices=(0, 1, 2, 3)",
    "focalnet_small": "type='FocalNet', embed_dim=96, depths=[2, 2, 18, 2], mlp_ratio=4.0, drop_path_rate=0.2, patch_norm=True, "
                      "focal_windows=[9, 9, 9, 9], focal_levels=[2, 2, 2, 2], out_indices=(0, 1, 2, 3)",
    "focalnet_base": "type='FocalNet', embed_dim=128, depths=[2, 2, 18, 2], mlp_ratio=4.0, drop_path_rate=0.3, patch_norm=True, "
                     "focal_windows=[9, 9, 9, 9], focal_levels=[3, 3, 3, 3], out_indices=(0, 1, 2, 3)",
    # MSG-Transformer: no official detection config; gradlens' own Swin-style layout (gradlens/models/backbones/msg.py)
    "msg_tiny": "type='MSGTransformer', embed_dim=64, depths=[2, 4, 12, 4], num_heads=[2, 4, 8, 16], window_size=7, "
                "shuffle_size=[4, 4, 2, 1], out_indices=(0, 1, 2, 3)",
    "msg_small": "type='MSGTransformer', embed_dim=96, depths=[2, 4, 12, 4], num_heads=[3, 6, 12, 24], window_size=7, "
                 "shuffle_size=[4, 4, 2, 1], out_indices=(0, 1, 2, 3)",
    "msg_base": "type='MSGTransformer', embed_dim=96, depths=[2, 4, 28, 4], num_heads=[3, 6, 12, 24], window_size=7, "
                "shuffle_size=[4, 4, 2, 1], out_indices=(0, 1, 2, 3)",
    # RevCol: the official Detection/configs/revcol/cascade_mask_rcnn_revcol_*_3x_in1k.py backbones
    "revcol_tiny": "type='RevCol', channels=[64, 128, 256, 512], layers=[2, 2, 4, 2], num_subnet=4, drop_path=0.3, "
                   "save_memory=False, out_indices=[0, 1, 2, 3]",
    "revcol_small": "type='RevCol', channels=[64, 128, 256, 512], layers=[2, 2, 4, 2], num_subnet=8, drop_path=0.4, "
                    "save_memory=False, out_indices=[0, 1, 2, 3]",
    "revcol_base": "type='RevCol', channels=[72, 144, 288, 576], layers=[1, 1, 3, 2], num_subnet=16, drop_path=0.4, "
                   "save_memory=False, out_indices=[0, 1, 2, 3]",
    "resnet50": "type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), norm_cfg=dict(type='SyncBN', requires_grad=True)",
}
NECK = {
    "cednet": "neck=None",
    "convnext": "neck=dict(type='FPN', in_channels={ch}, out_channels=256, start_level=1, add_extra_convs='on_input', num_outs=5)",
}
CHANNELS = {"convnext_tiny": [96, 192, 384, 768], "convnext_small": [96, 192, 384, 768], "convnext_base": [128, 256, 512, 1024],
            "swin_tiny": [96, 192, 384, 768], "swin_small": [96, 192, 384, 768], "swin_base": [128, 256, 512, 1024],
            "resnet50": [256, 512, 1024, 2048], "cswin_tiny": [64, 128, 256, 512],
            "hrnet_w32": [32, 64, 128, 256],
            "focalnet_tiny": [96, 192, 384, 768], "focalnet_small": [96, 192, 384, 768], "focalnet_base": [128, 256, 512, 1024],
            "revcol_tiny": [64, 128, 256, 512], "revcol_small": [64, 128, 256, 512], "revcol_base": [72, 144, 288, 576],
            "msg_tiny": [64, 128, 256, 512], "msg_small": [96, 192, 384, 768], "msg_base": [96, 192, 384, 768]}


def config_text(name: str, test_scale: tuple[int, int] = (800, 1333), size_divisor: int = 128) -> str:
    """A config as mmcv's ``Config.pretty_text`` would store it in ``meta['config']`` (the parts that matter).

    ``test_scale`` and ``size_divisor`` are the test pipeline's; tests write smaller ones to run full-size
    backbones on small images.
    """
    neck = NECK["cednet"] if name.startswith(("cednet", "ced_")) else NECK["convnext"].format(ch=CHANNELS[name])
    return (
        "model = dict(\n    type='RetinaNet',\n"
        f"    backbone=dict({BACKBONE_CONFIGS[name]}),\n    {neck},\n"
        "    bbox_head=dict(type='RetinaHead', num_classes=80, in_channels=256, stacked_convs=4, feat_channels=256,\n"
        "        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,\n"
        "            ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),\n"
        "        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0]),\n"
        "        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),\n"
        "        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),\n"
        "    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))\n"
        "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)\n"
        "test_pipeline = [\n    dict(type='LoadImageFromFile'),\n"
        f"    dict(type='MultiScaleFlipAug', img_scale={tuple(test_scale)}, flip=False, transforms=[\n"
        "        dict(type='Resize', keep_ratio=True), dict(type='RandomFlip'),\n"
        "        dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),\n"
        f"        dict(type='Pad', size_divisor={size_divisor}), dict(type='ImageToTensor', keys=['img']), dict(type='Collect', keys=['img'])])\n]\n"
    )


def official_extras(detector, state: dict) -> dict:
    """Buffers a real mmdetection checkpoint carries that gradlens recomputes or does not keep."""
    out = dict(state)
    for key, module in detector.named_modules():
        if hasattr(module, "relative_position_index") and key.startswith("backbone.body."):
            out[f"backbone.{key[len('backbone.body.'):]}.relative_position_index"] = module.relative_position_index.clone()
        if type(module).__name__ == "FrozenBatchNorm2d" and key.startswith("backbone.body."):
            out[f"backbone.{key[len('backbone.body.'):]}.num_batches_tracked"] = torch.tensor(1000)
    return out


@torch.no_grad()
def calibrate_batch_norms(detector, seed: int = 0, size: int = 256) -> int:
    """Set every backbone BatchNorm's running statistics to those of its input on a random image, in the order
    the forward pass reaches them, so each normalises its input to zero mean and unit variance.

    Kaiming-initialised convolutions with identity statistics (mean 0, variance 1) grow the activations
    branch after branch: a random full-size HRNet's input gradient reached 1e10, where float32 round-off
    alone exceeds any useful tolerance. Calibrated statistics keep the network well-conditioned (a
    variance-preserving initialisation, as a trained network is). Returns the number of layers calibrated.
    """
    norms = [m for m in detector.backbone.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]

    def calibrate(module, inputs):
        x = inputs[0].double()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6))

    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    training = detector.training
    detector.eval()
    try:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
        detector.backbone(x)
    finally:
        for h in hooks:
            h.remove()
        detector.train(training)
    return len(norms)


def make(name: str, out_dir: Path, seed: int = 0, convnext_out_indices=None, test_scale: tuple[int, int] = (800, 1333),
         size_divisor: int = 128, native: bool = True) -> tuple[Path, Path | None]:
    """Write ``<name>.pth`` (mmdetection layout) and, with ``native``, ``<name>.gradlens.pth`` (same weights, gradlens format)."""
    torch.manual_seed(seed)
    options = {}
    if convnext_out_indices is not None:
        options["out_indices"] = list(convnext_out_indices)
    detector = build_detector(f"retinanet_{name}", 80, options)
    with torch.no_grad():
        for param in detector.parameters():  # LayerNorm/BN weights of 1 and biases of 0 would hide key mix-ups
            param.add_(torch.randn_like(param) * 0.02)
        detector.head.classification_head.cls_logits.bias.fill_(-1.0)
    calibrate_batch_norms(detector, seed)
    detector.categories = coco80_categories()
    state = official_extras(detector, to_mmdet(detector.state_dict()))
    payload = {
        "meta": {
            "mmdet_version": "2.25.0",
            "CLASSES": tuple(c["name"] for c in detector.categories),
            "config": config_text(name, test_scale, size_divisor),
            "epoch": 36,
            "iter": 263736,
        },
        "state_dict": state,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    mmdet_path = out_dir / f"{name}.pth"
    torch.save(payload, mmdet_path)
    native_path = save_detector(detector, out_dir / f"{name}.gradlens.pth") if native else None
    return mmdet_path, native_path


# mmdetection 3.x's ResNet-50 RetinaNet config (configs/retinanet/retinanet_r50_fpn_1x_coco.py with its _base_ files)
# as mmengine's Config.pretty_text stores it in meta['cfg']: keys sorted, variables expanded, tta_pipeline included.
MMDET3_CONFIG = """auto_scale_lr = dict(base_batch_size=16, enable=False)
backend_args = None
data_root = 'data/coco/'
dataset_type = 'CocoDataset'
default_scope = 'mmdet'
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl'), mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
load_from = None
log_level = 'INFO'
model = dict(
    backbone=dict(depth=50, frozen_stages=1, init_cfg=dict(checkpoint='torchvision://resnet50', type='Pretrained'),
        norm_cfg=dict(requires_grad=True, type='BN'), norm_eval=True, num_stages=4, out_indices=(0, 1, 2, 3),
        style='pytorch', type='ResNet'),
    bbox_head=dict(
        anchor_generator=dict(octave_base_scale=4, ratios=[0.5, 1.0, 2.0], scales_per_octave=3,
            strides=[8, 16, 32, 64, 128], type='AnchorGenerator'),
        bbox_coder=dict(target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0], type='DeltaXYWHBBoxCoder'),
        feat_channels=256, in_channels=256, loss_bbox=dict(loss_weight=1.0, type='L1Loss'),
        loss_cls=dict(alpha=0.25, gamma=2.0, loss_weight=1.0, type='FocalLoss', use_sigmoid=True),
        num_classes=80, stacked_convs=4, type='RetinaHead'),
    data_preprocessor=dict(bgr_to_rgb=True, mean=[123.675, 116.28, 103.53], pad_size_divisor={divisor},
        std=[58.395, 57.12, 57.375], type='DetDataPreprocessor'),
    neck=dict(add_extra_convs='on_input', in_channels=[256, 512, 1024, 2048], num_outs=5, out_channels=256,
        start_level=1, type='FPN'),
    test_cfg=dict(max_per_img=100, min_bbox_size=0, nms=dict(iou_threshold=0.5, type='nms'), nms_pre=1000,
        score_thr=0.05),
    train_cfg=dict(allowed_border=-1, assigner=dict(ignore_iof_thr=-1, min_pos_iou=0, neg_iou_thr=0.4,
        pos_iou_thr=0.5, type='MaxIoUAssigner'), debug=False, pos_weight=-1, sampler=dict(type='PseudoSampler')),
    type='RetinaNet')
optim_wrapper = dict(optimizer=dict(lr=0.01, momentum=0.9, type='SGD', weight_decay=0.0001), type='OptimWrapper')
test_cfg = dict(type='TestLoop')
test_dataloader = dict(
    batch_size=1,
    dataset=dict(ann_file='annotations/instances_val2017.json', backend_args=None, data_prefix=dict(img='val2017/'),
        data_root='data/coco/', pipeline=[
            dict(backend_args=None, type='LoadImageFromFile'),
            dict(keep_ratio=True, scale={scale}, type='Resize'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'), type='PackDetInputs'),
        ], test_mode=True, type='CocoDataset'),
    drop_last=False, num_workers=2, persistent_workers=True, sampler=dict(shuffle=False, type='DefaultSampler'))
test_pipeline = [
    dict(backend_args=None, type='LoadImageFromFile'),
    dict(keep_ratio=True, scale={scale}, type='Resize'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'), type='PackDetInputs'),
]
train_cfg = dict(max_epochs=12, type='EpochBasedTrainLoop', val_interval=1)
tta_model = dict(tta_cfg=dict(max_per_img=100, nms=dict(iou_threshold=0.5, type='nms')), type='DetTTAModel')
tta_pipeline = [
    dict(backend_args=None, type='LoadImageFromFile'),
    dict(transforms=[[dict(keep_ratio=True, scale=(1333, 800), type='Resize')],
        [dict(prob=1.0, type='RandomFlip'), dict(prob=0.0, type='RandomFlip')],
        [dict(type='LoadAnnotations', with_bbox=True)],
        [dict(meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip', 'flip_direction'),
            type='PackDetInputs')]], type='TestTimeAug'),
]
work_dir = './work_dirs/retinanet_r50_fpn_1x_coco'
"""


def make_mmdet3(out_dir: Path, seed: int = 0, test_scale: tuple[int, int] = (1333, 800), pad_size_divisor: int = 32,
                config: str | None = None, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``resnet50.mmdet3.pth``, the ResNet-50 RetinaNet as mmdetection 3.x (mmengine) saves it, and its 2.x
    twin ``resnet50.pth`` (:func:`make`: the same weights, config asking for the same test scale and divisor).

    The 3.x file holds what ``tools/model_converters/publish_model.py`` keeps of a ``Runner.save_checkpoint``:
    ``meta`` with ``cfg`` (the config text, :data:`MMDET3_CONFIG`), ``dataset_meta`` (COCO's class names and
    palette), ``mmengine_version``, ``seed``, ``experiment_name``, ``time``, ``epoch``, ``iter``, and the state
    dict in the 2.x key layout (the same module names). ``config`` replaces the config text and ``meta``
    entries replace or (as None) remove meta keys, for tests of refusals.
    """
    twin, _ = make("resnet50", out_dir, seed, test_scale=tuple(sorted(test_scale)), size_divisor=pad_size_divisor,
                   native=False)
    state = torch.load(twin, map_location="cpu", weights_only=True)["state_dict"]
    classes = tuple(c["name"] for c in coco80_categories())
    payload = {
        "meta": {
            "dataset_meta": {"classes": classes, "palette": [((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
                                                             for i in range(len(classes))]},
            "epoch": 12,
            "iter": 87960,
            "cfg": MMDET3_CONFIG.format(scale=tuple(test_scale), divisor=pad_size_divisor) if config is None else config,
            "seed": seed,
            "experiment_name": "retinanet_r50_fpn_1x_coco_20240101_000000",
            "time": "20240101_120000",
            "mmengine_version": "0.10.3",
        },
        "state_dict": state,
    }
    for key, value in (meta or {}).items():
        if value is None:
            payload["meta"].pop(key, None)
        else:
            payload["meta"][key] = value
    path = out_dir / "resnet50.mmdet3.pth"
    torch.save(payload, path)
    return path, twin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", nargs="+", default=list(BACKBONE_CONFIGS), choices=list(BACKBONE_CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.config:
        paths = make(name, args.out, args.seed)
        print(f"{name}: {paths[0]} and {paths[1]}", flush=True)


if __name__ == "__main__":
    main()
