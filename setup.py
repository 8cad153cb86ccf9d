"""Builds the native parts (native/*.pyx) into the appliance package: the broker's
scheduling core, and the shared-memory lock and rate-limit table of the API workers.

Metadata and dependencies live in pyproject.toml; this file exists for the
Cython extension only.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("appliance.broker._pqueue", ["native/pqueue.pyx"], extra_compile_args=["-O2"]),
         Extension("appliance._shm", ["native/shm.pyx"], extra_compile_args=["-O2"])],
        language_level=3,
    ),
)
