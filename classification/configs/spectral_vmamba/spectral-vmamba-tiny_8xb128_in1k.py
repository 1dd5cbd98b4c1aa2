# Spectral VMamba-T (depths 2-2-5-2, widths 256..2048) on ImageNet-1k with the shared Swin-style recipe.
# The RFN's frozen ResNet-18 starts from torchvision's ImageNet weights: `init_weights()` loads them from the torch
# hub cache (~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth), downloading when online; offline and uncached it
# keeps random weights and says so. A checkpoint of the whole backbone (init_cfg) holds the RFN and takes precedence.
_base_ = '../_base_/in1k_swin-recipe.py'

model = dict(
    backbone=dict(type='SpectralVMamba', arch='tiny', drop_path_rate=0.2, rfn_pretrained='torchvision://resnet18'),
    head=dict(in_channels=2048))
