"""The one compiled piece: the merge's one-pass weighted sum (trainer/_weighted_sum.c).

Everything else is in pyproject.toml. The extension is optional: where no C compiler works,
the install goes on and the merge uses torch's block path, slower (trainer/merge.py warns).
No FMA contraction: its sums have the same bits on every machine. It is a top-level module,
not part of `trainer`, so that a submitted job, which imports `trainer` from its uploaded
sources, still finds it where Tributary is installed.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "_tributary_weighted_sum", sources=["trainer/_weighted_sum.c"], optional=True,
    extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"], extra_link_args=["-pthread"])])
