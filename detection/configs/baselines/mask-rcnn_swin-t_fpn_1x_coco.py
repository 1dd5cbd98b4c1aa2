# Baseline: Mask R-CNN with mmpretrain's Swin-T, COCO 1x on mmdet's Swin-T recipe, exactly as the vssm T configs
# (the same class as in classification, so classification checkpoints load with prefix='backbone.').
# Small feature maps are padded to the window size, as mmdet's own Swin does.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../../../configs/_base_/custom_imports.py']

pretrained = 'checkpoints/swin-tiny_8xb128_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.SwinTransformer',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        pad_small_map=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))
