_base_ = './spectral-vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py'

pretrained = 'checkpoints/spectral-vmamba-small_8xb128_in1k.pth'
model = dict(backbone=dict(arch='small', drop_path_rate=0.6, init_cfg=dict(checkpoint=pretrained)))
