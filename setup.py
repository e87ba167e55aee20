"""Packaging for motg (nbdev 2 layout: metadata in settings.ini, pinned dependencies in requirements.txt)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]
requirements = [line.strip() for line in Path("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-"))]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    license="Apache-2.0",
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=["motg", "motg.*"]),
    include_package_data=True,
    install_requires=requirements,
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
