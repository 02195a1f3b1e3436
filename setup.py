"""Build dit_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

Environment:
  FORCE_CUDA=1            build the CUDA sources even without a visible GPU (needs nvcc / CUDA_HOME)
  FORCE_CPU=1             never build the CUDA sources
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (ninja)
  NVCC_FLAGS              extra nvcc flags
  DEBUG=1                 -O0 -g
  DIT_WHEEL_CUDA_HEADERS=0  do not add the torch wheel's nvidia/*/include dirs to CPATH
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    # Key on a CUDA build of torch plus nvcc, not on torch.cuda.is_available():
    # build hosts often have no GPU.
    return torch.version.cuda is not None and CUDA_HOME is not None


def _build_helpers():
    """dit_kernels/_build.py, loaded by path: the package itself is not importable before the build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dit_kernels_build", os.path.join(ROOT, "dit_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    helpers = _build_helpers()
    extra_link = ["-fopenmp"] + helpers.shared_libstdcxx_link_args()
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        if os.environ.get("DIT_WHEEL_CUDA_HEADERS", "1") == "1":
            helpers.add_wheel_cuda_headers_to_cpath()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc_flags = opt + [
            "--use_fast_math",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "--threads=2",
        ] + os.environ.get("NVCC_FLAGS", "").split()
        return [
            CUDAExtension(
                "dit_kernels._C",
                sources,
                define_macros=define_macros + [("WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": nvcc_flags},
                extra_link_args=extra_link,
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "dit_kernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
            py_limited_api=True,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="dit_kernels",
    version="0.1.0",
    description="Fused kernels and the DiT / SiT / MaskDiT / SD-DiT training and sampling stack",
    packages=find_packages(include=["dit_kernels", "dit_kernels.*", "dit_models", "dit_models.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.11", "numpy", "ninja", "pybind11"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark"],
        "data": ["scikit-learn", "pillow", "matplotlib"],
        "triton": ["triton"],
        "flash": ["flash-attn"],
        "ode": ["torchdiffeq"],
        "vae": ["diffusers"],
    },
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    entry_points={
        "console_scripts": [
            "dit-train=dit_models.train:cli",
            "dit-sample=dit_models.sample:cli",
            "dit-sample-ddp=dit_models.sample_ddp:cli",
            "dit-evaluate=dit_models.evaluate:cli",
            "dit-extract-latents=dit_models.extract_latents:cli",
        ]
    },
)
