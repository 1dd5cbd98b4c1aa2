# Mask R-CNN with a VMamba-T backbone, COCO 1x (12 epochs), on mmdet's Swin-T recipe
# (AdamW lr 1e-4, weight decay 0.05, 2 images per GPU on 8 GPUs).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../../../configs/_base_/custom_imports.py']

# ImageNet weights: converted upstream ones (tools/model_converters/vmamba_to_vssm.py) or our training.
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
