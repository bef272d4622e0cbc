"""The whole model: backbone + FPN + head, built from a `config.Config`.

    model = build_model(cfg, num_classes=3)
    losses = model(images, labels_list, masks_list, boxes_list)   # dict(total, cate, mask)
    results = model.predict(images, metas)                        # per image masks/labels/scores

`forward` returns losses so that DistributedDataParallel (which wraps `forward`) sees the whole
training computation. Checkpoints store the config, and `build_model` rebuilds the exact model
from it.

Shape legend: B batch, N instances, H x W padded input, k kept instances, h0 x w0 original size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from backbone import build_backbone
from config import Config
from solo_head import SOLOHead

MODELS = ("solo",)


class SOLOModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        images: Tensor,
        labels_list: list[Tensor],
        masks_list: list[Tensor],
        boxes_list: list[Tensor],
    ) -> dict[str, Tensor]:
        """Training losses of a batch: images (B, 3, H, W); per image labels (N,), masks
        (N, H, W) and boxes (N, 4) in padded-input pixels. Returns dict(total, cate, mask)."""
        lvl_cate_preds, lvl_mask_feats = self.head(self.backbone(images), eval=False)
        # Losses in float32 even under autocast (bf16 on the CPU, fp16 on CUDA): the focal
        # loss sums ~10^4 small terms and the dice loss sums over whole masks.
        with torch.autocast(images.device.type, enabled=False):
            preds = ([p.float() for p in lvl_cate_preds], [f.float() for f in lvl_mask_feats])
            losses = self.head.loss(
                preds, boxes_list, labels_list, masks_list, padded_size=tuple(images.shape[-2:])
            )
        return {k: losses[k] for k in ("total", "cate", "mask")}

    @torch.no_grad()
    def predict(self, images: Tensor, metas: list[dict] | None = None) -> list[dict[str, Tensor]]:
        """Instances per image: dict(masks (k, h0, w0) uint8, labels (k,) in 1..C, scores (k,)).

        metas (from the data set) give each image's input and original size; without them the
        masks stay at the padded size.
        """
        preds = self.head(self.backbone(images), eval=True)
        return self.head.PostProcess(preds, metas, padded_size=tuple(images.shape[-2:]))


def build_model(cfg: Config, num_classes: int) -> SOLOModel:
    """The model of `cfg` for `num_classes` object classes (background not counted)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {MODELS}")
    backbone = build_backbone(
        depth=cfg.depth,
        out_channels=cfg.fpn_channels,
        weights=cfg.backbone_weights or None,
        norm=cfg.norm,
    )
    head = SOLOHead(
        num_classes=num_classes + 1,
        in_channels=cfg.fpn_channels,
        seg_feat_channels=cfg.seg_feat_channels,
        stacked_convs=cfg.stacked_convs,
        strides=cfg.strides,
        scale_ranges=cfg.scale_ranges,
        epsilon=cfg.epsilon,
        num_grids=cfg.num_grids,
        mask_loss_weight=cfg.mask_loss_weight,
        focal_gamma=cfg.focal_gamma,
        focal_alpha=cfg.focal_alpha,
        focal_norm=cfg.focal_norm,
        init=cfg.init,
        gn_groups=min(32, cfg.seg_feat_channels),
        cate_thresh=cfg.cate_thresh,
        ins_thresh=cfg.ins_thresh,
        pre_NMS_num=cfg.pre_nms_num,
        keep_instance=cfg.keep_instance,
        nms_kernel=cfg.nms_kernel,
        nms_sigma=cfg.nms_sigma,
        update_thresh=cfg.update_thresh,
    )
    return SOLOModel(backbone, head)
