# Spectral VMamba-S (depths 2-2-15-2).
_base_ = './spectral-vmamba-tiny_8xb128_in1k.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.6))
