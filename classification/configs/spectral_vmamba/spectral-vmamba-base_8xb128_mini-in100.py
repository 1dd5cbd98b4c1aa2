# Spectral VMamba-BASE on mini-ImageNet (100 classes).
_base_ = './spectral-vmamba-tiny_8xb128_mini-in100.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.3))
