"""Shared by the kernels' setup.py files: the nvcc/torch CUDA version check and the compiler flags."""
import re
import subprocess

import torch
from torch.utils.cpp_extension import CUDA_HOME


def check_nvcc_matches_torch() -> str:
    """Stop with a clear message when nvcc's CUDA major version differs from torch.version.cuda's."""
    if torch.version.cuda is None:
        raise SystemExit(f'torch {torch.__version__} is a CPU-only build: install a CUDA build of torch to build '
                         'the vssm kernels (everything also runs without them, on the PyTorch reference ops).')
    if CUDA_HOME is None:
        raise SystemExit('nvcc was not found: set CUDA_HOME to the CUDA toolkit matching torch.version.cuda = '
                         f'{torch.version.cuda}.')
    out = subprocess.run([f'{CUDA_HOME}/bin/nvcc', '--version'], capture_output=True, text=True, check=True).stdout
    nvcc = re.search(r'release (\d+)\.(\d+)', out)
    if nvcc is None:
        raise SystemExit(f'could not read the version of {CUDA_HOME}/bin/nvcc:\n{out}')
    if nvcc.group(1) != torch.version.cuda.split('.')[0]:
        raise SystemExit(f'nvcc is CUDA {nvcc.group(1)}.{nvcc.group(2)} ({CUDA_HOME}) but torch {torch.__version__} '
                         f'was built with CUDA {torch.version.cuda}: their major versions must match. Point CUDA_HOME '
                         'at a matching toolkit or install the torch build for your CUDA.')
    return f'{nvcc.group(1)}.{nvcc.group(2)}'


EXTRA_COMPILE_ARGS = {
    'cxx': ['-O3'],
    # Architectures come from TORCH_CUDA_ARCH_LIST (read by torch.utils.cpp_extension), never hard-coded here.
    'nvcc': ['-O3', '-lineinfo', '--threads', '4', '--expt-relaxed-constexpr', '-U__CUDA_NO_HALF_OPERATORS__',
             '-U__CUDA_NO_HALF_CONVERSIONS__', '-U__CUDA_NO_BFLOAT16_CONVERSIONS__'],
}
