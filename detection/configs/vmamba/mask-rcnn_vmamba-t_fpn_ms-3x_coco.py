# Mask R-CNN with VMamba-T, COCO 3x (36 epochs) with multi-scale + crop training (mmdet's Swin-T ms-3x recipe).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py', '../../../configs/_base_/custom_imports.py']

pretrained = 'checkpoints/vmamba-tiny_8xb128_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.VMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.A_logs': dict(decay_mult=0.), '.Ds': dict(decay_mult=0.)}))
