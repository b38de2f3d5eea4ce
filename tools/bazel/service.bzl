"""The standard targets of an InferGrid service, in one macro (see tools/bazel/README.md)."""

load("//tools/bazel:python.bzl", "py_pytest")

def infergrid_service(name, deps = [], test_size = "medium", test_tags = [], **kwargs):
    """Declares :<name> (py_library), :server (py_binary) and :tests (py_pytest) for services/<name>.

    Args:
      name: the service package name, e.g. "features".
      deps: extra py_library deps beyond //libs and //protos:protos_py.
      test_size: Bazel size of the tests ("large" for tests that start real servers).
      test_tags: tags for the tests, e.g. ["exclusive"].
      **kwargs: passed to py_pytest (env, data, args, ...).
    """
    native.py_library(
        name = name,
        # __main__.py is included so tests can start the service as `python -m services.<name>`.
        srcs = native.glob(["*.py"], exclude = ["tests/**"]) + ["//services:__init__.py"],
        visibility = ["//visibility:public"],
        deps = ["//libs", "//protos:protos_py"] + deps,
    )

    # bazel run //services/<name>:server
    native.py_binary(
        name = "server",
        srcs = ["__main__.py"],
        main = "__main__.py",
        deps = [":" + name],
    )

    py_pytest(
        name = "tests",
        size = test_size,
        srcs = native.glob(["tests/*.py"]),
        deps = [":" + name],
        tags = test_tags,
        **kwargs
    )
