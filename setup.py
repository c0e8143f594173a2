"""Bundle the top-level ``schemas/`` and ``projects/`` folders (and ``constraints/ci.txt``) into built wheels.

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
        bundled = Path(self.build_lib) / "lorabuild" / "_bundled"
        shutil.copytree(HERE / "schemas", bundled / "schemas", dirs_exist_ok=True)
        # Only the demo: a clone's other projects are the user's, not the package's.
        shutil.copytree(HERE / "projects" / "demo", bundled / "projects" / "demo", dirs_exist_ok=True)
        shutil.copy2(HERE / "projects" / "demo.yaml", bundled / "projects" / "demo.yaml")
        # the tested library versions, which `lorabuild doctor` compares the installed ones with
        (bundled / "constraints").mkdir(exist_ok=True)
        shutil.copy2(HERE / "constraints" / "ci.txt", bundled / "constraints" / "ci.txt")


setup(cmdclass={"build_py": BuildWithBundledData})
