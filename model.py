"""The whole model: backbone + FPN + head, built from a `config.Config`.

    model = build_model(cfg, num_classes=3)
    losses = model(images, labels_list, masks_list, boxes_list)   # dict(total, cate, mask)
    results = model.predict(images, metas)                        # per image masks/labels/scores

`forward` returns losses so that DistributedDataParallel (which wraps `forward`) sees the whole
training computation. Checkpoints store the config, and `build_model` rebuilds the exact model
from it.

`cfg.model` picks the head (config.MODELS): `solo` (solo_head.SOLOHead), `decoupled_solo` and
`decoupled_solo_light` (decoupled_head.DecoupledSOLOHead with separate or shared X/Y towers),
`solov2` and `solov2_light` (solov2_head.SOLOv2Head; light only differs in its config
defaults, config.MODEL_DEFAULTS). Every head has the same `forward(feats, eval)`, `loss` and
`PostProcess` interface; only the tuple of predictions between them differs.

Shape legend: B batch, N instances, H x W padded input, k kept instances, h0 x w0 original size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from backbone import build_backbone
from config import MODELS, Config
from decoupled_head import DecoupledSOLOHead
from solo_head import SOLOHead
from solov2_head import SOLOv2Head


def _float(preds):
    """Every tensor of a (nested) tuple / list of predictions in float32."""
    if isinstance(preds, Tensor):
        return preds.float()
    return type(preds)(_float(p) for p in preds)


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
        preds = self.head(self.backbone(images), eval=False)  # the head's tuple of outputs
        # Losses in float32 even under autocast (bf16 on the CPU, fp16 on CUDA): the focal
        # loss sums ~10^4 small terms and the dice loss sums over whole masks.
        with torch.autocast(images.device.type, enabled=False):
            preds = _float(preds)
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
    head = build_head(cfg, num_classes)
    backbone = build_backbone(
        depth=cfg.depth,
        out_channels=cfg.fpn_channels,
        weights=cfg.backbone_weights or None,
        norm=cfg.norm,
        width=cfg.backbone_width,
    )
    return SOLOModel(backbone, head)


def build_head(cfg: Config, num_classes: int) -> nn.Module:
    """The head of `cfg.model` for `num_classes` object classes (background not counted)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {MODELS}")
    common = dict(
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
    if cfg.model == "solo":
        return SOLOHead(**common)
    if cfg.model in ("decoupled_solo", "decoupled_solo_light"):
        # The light head shares one X/Y tower (the authors' DecoupledSOLOLightHead).
        return DecoupledSOLOHead(**common, shared_xy_tower=cfg.model == "decoupled_solo_light")
    return SOLOv2Head(
        **common,
        kernel_channels=cfg.kernel_channels,
        mask_feat_channels=cfg.mask_feat_channels,
        mask_loss_stride=cfg.mask_loss_stride,
    )
