# Spatial-Mamba-T on ImageNet-1k with the shared Swin-style recipe (classification/configs/_base_/in1k_swin-recipe.py).
_base_ = '../_base_/in1k_swin-recipe.py'

model = dict(backbone=dict(type='SpatialMamba', arch='tiny', drop_path_rate=0.2), head=dict(in_channels=512))
