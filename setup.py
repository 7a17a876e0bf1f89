"""Build the Cython kernels of Ferry's hot path; all metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "mover._kernels",
        ["ext/kernels.pyx"],
        libraries=["crypto", "zstd"],
        extra_compile_args=["-O3", "-march=x86-64-v2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
