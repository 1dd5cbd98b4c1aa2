_base_ = './vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py'

pretrained = 'checkpoints/vmamba-small_8xb128_in1k.pth'
model = dict(backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)))
