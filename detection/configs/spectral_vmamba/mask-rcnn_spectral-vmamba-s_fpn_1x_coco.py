_base_ = './mask-rcnn_spectral-vmamba-t_fpn_1x_coco.py'

pretrained = 'checkpoints/spectral-vmamba-small_8xb128_in1k.pth'
model = dict(backbone=dict(arch='small', drop_path_rate=0.6, init_cfg=dict(checkpoint=pretrained)))
