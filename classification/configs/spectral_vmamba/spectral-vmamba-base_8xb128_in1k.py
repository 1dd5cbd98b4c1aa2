# Spectral VMamba-B: upstream's base is the small network with drop path 0.3.
_base_ = './spectral-vmamba-tiny_8xb128_in1k.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.3))
