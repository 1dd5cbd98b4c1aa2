# Mask R-CNN with Spatial-Mamba-T, COCO 3x (36 epochs) with multi-scale + crop training (mmdet's Swin-T ms-3x recipe).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py', '../../../configs/_base_/custom_imports.py']

pretrained = 'checkpoints/spatial-mamba-tiny_8xb128_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.SpatialMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[64, 128, 256, 512]))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.A_logs': dict(decay_mult=0.), '.Ds': dict(decay_mult=0.)}))
