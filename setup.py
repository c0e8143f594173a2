"""Bundle the top-level ``schemas/`` and ``projects/`` folders into built wheels.

In a source checkout (and an editable install) lorabuild reads them where they are;
a wheel carries copies under ``lorabuild/_bundled/`` (see ``lorabuild/resources.py``).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithBundledData(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        for name in ("schemas", "projects"):
            dst = Path(self.build_lib) / "lorabuild" / "_bundled" / name
            shutil.copytree(HERE / name, dst, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithBundledData})
