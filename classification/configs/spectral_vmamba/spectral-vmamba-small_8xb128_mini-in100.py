# Spectral VMamba-SMALL on mini-ImageNet (100 classes).
_base_ = './spectral-vmamba-tiny_8xb128_mini-in100.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.6))
