_base_ = './mask-rcnn_spectral-vmamba-t_fpn_1x_coco.py'

pretrained = 'checkpoints/spectral-vmamba-base_8xb128_in1k.pth'
model = dict(backbone=dict(arch='base', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)))
