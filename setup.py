"""Install dit_kernels / dit_models; compile dit_kernels._C ahead of time when torch is importable.

  pip install -e .                        # build isolation: no torch in the build environment, so no
                                          # library is compiled here; `import dit_kernels` compiles it
                                          # once against the torch it runs with (dit_kernels/_build.py)
  pip install --no-build-isolation -e .   # compiles now against the installed torch
  python setup.py build_ext --inplace     # the same, for a source checkout

The C++ CPU kernels are always built; the CUDA kernels where they can build and are wanted
(dit_kernels/_build.py want_cuda: FORCE_CUDA=1, or a CUDA torch + nvcc + a visible GPU).

Environment:
  FORCE_CUDA=1            build the CUDA sources even without a visible GPU (needs nvcc / CUDA_HOME)
  FORCE_CPU=1             never build the CUDA sources
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (ninja)
  NVCC_FLAGS              extra nvcc flags
  DEBUG=1                 -O0 -g
  DIT_WHEEL_CUDA_HEADERS=0  do not add the torch wheel's nvidia/*/include dirs to CPATH
"""
import importlib.util
import json
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_helpers():
    """dit_kernels/_build.py, loaded by path: the package itself is not importable before the build."""
    spec = importlib.util.spec_from_file_location("dit_kernels_build", os.path.join(ROOT, "dit_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _extensions(helpers):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cuda, why = helpers.want_cuda()
    print(f"dit_kernels: building the {'C++ and CUDA' if cuda else 'C++'} kernels ({why})")
    kwargs = dict(
        sources=[os.path.relpath(p, ROOT) for p in helpers.sources(helpers.csrc_dir(), cuda)],
        define_macros=[("Py_LIMITED_API", "0x03090000")],
        extra_link_args=helpers.link_flags(),
        py_limited_api=True,
    )
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        helpers.add_wheel_cuda_headers_to_cpath()
        return [CUDAExtension("dit_kernels._C", extra_compile_args={"cxx": helpers.cxx_flags(True),
                                                                   "nvcc": helpers.nvcc_flags()}, **kwargs)]
    return [CppExtension("dit_kernels._C", extra_compile_args={"cxx": helpers.cxx_flags(False)}, **kwargs)]


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (dit_kernels/_csrc), so that an installed wheel without a
    prebuilt library can still compile it on first import."""

    def run(self):
        super().run()
        if not self.editable_mode:
            target = os.path.join(self.build_lib, "dit_kernels", "_csrc")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "csrc"), target)


def _cmdclass():
    cmds = {"build_py": BuildPyWithSources}
    if not _have_torch():
        return cmds
    import torch
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithStamp(BuildExtension.with_options(use_ninja=True)):
        """Writes _C.build.json beside the library: the torch and the sources it was built from, so that
        import can tell a stale library (another torch, edited sources) from a good one before loading it."""

        def run(self):
            super().run()
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                with open(os.path.join(os.path.dirname(path), "_C.build.json"), "w") as f:
                    json.dump({"torch": torch.__version__, "cuda": any(s.endswith(".cu") for s in ext.sources),
                               "sources": _build_helpers().sources_digest()}, f)

    cmds["build_ext"] = BuildExtensionWithStamp
    return cmds


if _have_torch():
    EXT_MODULES = _extensions(_build_helpers())
else:
    print("dit_kernels: torch is not importable in this build environment (pip's build isolation); no library is "
          "compiled now: `import dit_kernels` compiles it once against the torch it runs with")
    EXT_MODULES = []

setup(
    name="dit_kernels",
    version="0.1.0",
    description="Fused kernels and the DiT / SiT / MaskDiT / SD-DiT training and sampling stack",
    packages=find_packages(include=["dit_kernels", "dit_kernels.*", "dit_models", "dit_models.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.11", "numpy", "ninja", "tqdm"],
    extras_require={
        # hypothesis: the op fuzzing tests; diffusers: the conversion / fuse tests and the diffusers anchors
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "diffusers"],
        "data": ["scikit-learn", "pillow", "matplotlib"],
        "triton": ["triton"],
        "flash": ["flash-attn"],
        "ode": ["torchdiffeq"],
        "vae": ["diffusers"],
        "diffusers": ["diffusers"],  # dit_models.convert_diffusers models, dit_kernels.integrations.diffusers
    },
    ext_modules=EXT_MODULES,
    cmdclass=_cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if EXT_MODULES else {},
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
