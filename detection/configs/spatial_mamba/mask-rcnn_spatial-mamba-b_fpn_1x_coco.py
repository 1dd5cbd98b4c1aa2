_base_ = './mask-rcnn_spatial-mamba-t_fpn_1x_coco.py'

pretrained = 'checkpoints/spatial-mamba-base_8xb128_in1k.pth'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
