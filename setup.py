"""The package layout, which ``[tool.setuptools.packages.find]`` in pyproject.toml cannot express.

``maas`` is two things: the client SDK (``./maas``, a regular package) and the code generated from
``protos/`` into ``gen/`` (``maas.registry.v1`` and so on, namespace packages). Finding packages in both
``.`` and ``gen`` would map ``maas`` itself to ``gen/maas`` and lose the SDK's ``__init__``; here each
generated package is mapped to its own directory instead, so ``maas`` stays ``./maas``.
"""

from setuptools import find_namespace_packages, setup

GENERATED = find_namespace_packages("gen", include=["maas.*", "inference", "inference.*"])
HAND_WRITTEN = find_namespace_packages(".", include=["services", "services.*", "shared", "shared.*"])

setup(
    packages=[*HAND_WRITTEN, "maas", *GENERATED],
    package_dir={package: "gen/" + package.replace(".", "/") for package in GENERATED},
)
