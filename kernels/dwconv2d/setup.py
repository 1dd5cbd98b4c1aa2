"""Build the CUDA depthwise conv and state fusion (module ``vssm_dwconv2d``).

    TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=8 pip install --no-build-isolation -v kernels/dwconv2d
"""
import os
import sys
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / 'common'))
from cuda_build import EXTRA_COMPILE_ARGS, check_nvcc_matches_torch  # noqa: E402

check_nvcc_matches_torch()
sources = ['csrc/dwconv2d.cpp'] + [f'csrc/dwconv2d_{d}_{t}.cu' for d in ('fwd', 'bwd')
                                   for t in ('fp32', 'fp16', 'bf16')]
setup(
    name='vssm-dwconv2d',
    version='0.1.0',
    description='CUDA depthwise conv (large/dilated kernels) and state fusion for vssm, forward and backward',
    ext_modules=[CUDAExtension('vssm_dwconv2d', sources, include_dirs=[str(HERE.parent / 'common')],
                               extra_compile_args=EXTRA_COMPILE_ARGS)],
    cmdclass={'build_ext': BuildExtension.with_options(use_ninja=os.environ.get('USE_NINJA', '1') == '1')},
)
