_base_ = './mask-rcnn_vmamba-t_fpn_ms-3x_coco.py'

pretrained = 'checkpoints/vmamba-small_8xb128_in1k.pth'
model = dict(backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)))
