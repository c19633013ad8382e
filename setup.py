"""Only what pyproject.toml cannot say: the wheel carries the top-level configs/ as tans/configs/.

configs/ stays the source of truth in the checkout (profiles, splits, the demo's recipes); an
installed package finds its copy through ``tans.job_configs.CONFIG_DIR``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's configs/ directly
        src = Path(__file__).resolve().parent / "configs"
        dst = Path(self.build_lib) / "tans" / "configs"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
