"""Python test helpers for InferGrid BUILD files (see tools/bazel/README.md)."""

_PYTEST_MAIN = "//tools/bazel:pytest_main.py"

def py_pytest(
        name,
        srcs,
        deps = [],
        data = [],
        args = [],
        size = "small",
        tags = [],
        **kwargs):
    """One py_test per test_*.py / *_test.py in srcs, each run by pytest, plus a test_suite `name`.

    Files in srcs that are not test files (conftest.py, fakes, helpers) go into
    every generated test. The repository's pyproject.toml (asyncio_mode = auto,
    markers) comes along, so async tests and fixtures work as under plain pytest.

    Args:
      name: name of the test_suite grouping the generated tests.
      srcs: test files and their conftest.py/helpers, e.g. glob(["tests/*.py"]).
      deps: py_library targets under test (//libs, //protos:protos_py, ...).
      data: extra runtime files.
      args: extra pytest arguments, e.g. ["-m", "not slow"].
      size: Bazel test size; "medium"/"large" for tests that start real servers.
      tags: e.g. ["integration"], ["exclusive"] (fixed ports), ["no-sandbox"].
      **kwargs: passed to every py_test (env, timeout, flaky, local, ...).
    """
    helpers = []
    tests = []
    for src in srcs:
        base = src.split("/")[-1]
        if base.endswith(".py") and (base.startswith("test_") or base.endswith("_test.py")):
            tests.append(src)
        else:
            helpers.append(src)
    if not tests:
        fail("py_pytest %s: no test_*.py or *_test.py in srcs" % name)

    names = []
    for test in tests:
        test_name = test.split("/")[-1][:-len(".py")]
        if test_name in names:
            fail("py_pytest %s: two test files named %s" % (name, test_name))
        names.append(test_name)
        native.py_test(
            name = test_name,
            srcs = [_PYTEST_MAIN, test] + helpers,
            main = _PYTEST_MAIN,
            args = ["$(location %s)" % test] + args,
            data = ["//:pyproject.toml"] + data,
            deps = deps,
            size = size,
            tags = tags,
            python_version = "PY3",
            srcs_version = "PY3",
            **kwargs
        )
    native.test_suite(name = name, tests = [":" + n for n in names], tags = tags)
