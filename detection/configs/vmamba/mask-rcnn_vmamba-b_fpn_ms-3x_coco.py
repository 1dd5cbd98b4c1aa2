_base_ = './mask-rcnn_vmamba-t_fpn_ms-3x_coco.py'

pretrained = 'checkpoints/vmamba-base_8xb128_in1k.pth'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.6, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
