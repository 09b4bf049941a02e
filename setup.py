"""Everything is declared in setup.cfg; this file only ships configs/ inside the wheel.

The shipped YAML configs live at the top of the repository (configs/), where the documented
commands name them. A wheel copies them to ``cmunet/configs/`` so that jobs run from an
installed package find their default configs too (:func:`cmunet.paths.config_file`).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads HERE/configs
            return
        target = Path(self.build_lib) / "cmunet" / "configs"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(HERE / "configs", target, ignore=shutil.ignore_patterns("*.pyc"))


setup(cmdclass={"build_py": BuildWithConfigs})
