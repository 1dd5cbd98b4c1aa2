# Spatial-Mamba-T with an exponential moving average of the weights (evaluated in place of the raw weights).
_base_ = './spatial-mamba-tiny_8xb128_in1k.py'

custom_hooks = [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
