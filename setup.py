"""Build the Cython kernels (workers/nsqjobs_tasks/kernels/_*_cy.pyx); the rest: pyproject."""

import glob
import os
import shlex
import shutil
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

NEEDS_COMPILER = (
    "nsqjobs: building the Cython kernel needs a C compiler and the Python headers "
    "(install gcc and python3-dev, e.g. apt-get install build-essential python3-dev)"
)

try:
    from Cython.Build import cythonize
except ImportError:
    raise SystemExit(
        "nsqjobs: building the Cython kernel needs Cython (pip install 'Cython>=3.0')"
    ) from None


class BuildExt(build_ext):
    """build_ext that turns a missing or failing C compiler into one clear line."""

    def run(self) -> None:
        # sysconfig's CC is what setuptools will spawn on POSIX; Windows (MSVC) has none to check.
        cc = os.environ.get("CC") or sysconfig.get_config_var("CC")
        if cc and shutil.which(shlex.split(cc)[0]) is None:
            raise SystemExit(f"{NEEDS_COMPILER}: {shlex.split(cc)[0]!r} not found")
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as exc:
            raise SystemExit(f"{NEEDS_COMPILER}: {exc}") from exc


posix = os.name != "nt"
extensions = [
    Extension(
        "nsqjobs_tasks.kernels." + os.path.basename(source)[: -len(".pyx")],
        [source],
        # Float kernels must stay bit-identical to Python's: no -march/-ffast-math, and no FMA
        # contraction even where FMA is baseline (aarch64), where gcc would fuse a*b+c.
        extra_compile_args=["-O3", "-ffp-contract=off"] if posix else [],
        libraries=["m"] if posix else [],
    )
    for source in sorted(glob.glob("workers/nsqjobs_tasks/kernels/_*_cy.pyx"))
]

setup(
    ext_modules=cythonize(extensions, language_level=3, include_path=["workers"]),
    cmdclass={"build_ext": BuildExt},
)
