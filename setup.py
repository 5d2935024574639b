"""Package discovery that pyproject.toml cannot express on its own.

deployment-tool/ keeps its place at the top of the source tree, but the daemon
must find it in an installed package: it ships as the package
``myx_deployment_tool`` (no __init__.py needed; the daemon locates it with
importlib). Subpackages of myxd are discovered, never listed by hand, so a new
one cannot be left out of the wheel.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(
            include=["myxd", "myxd.*", "myx_agent", "myx_agent.*", "twisted.plugins"],
            exclude=["*.__pycache__"],
        ),
        "myx_deployment_tool",
    ],
    package_dir={"myx_deployment_tool": "deployment-tool"},
)
