"""The standard targets of an InferGrid service, in one macro (see tools/bazel/README.md)."""

load("//tools/bazel:python.bzl", "py_pytest")

def _runfiles_tarball_impl(ctx):
    """Packs a py_binary's launcher and its runfiles tree into one tarball (the image's payload)."""
    binary = ctx.attr.binary[DefaultInfo]
    executable = ctx.executable.binary
    runfiles = binary.default_runfiles
    root = ctx.attr.prefix.strip("/")
    launcher = "%s/%s" % (root, executable.short_path)
    tree = launcher + ".runfiles/" + ctx.workspace_name

    # One "source<TAB>destination" line per file; "-" for the empty __init__.py files Bazel adds.
    lines = ["%s\t%s" % (executable.path, launcher)]
    for f in runfiles.files.to_list():
        if f.short_path.startswith("../"):
            dest = launcher + ".runfiles/" + f.short_path[3:]
        else:
            dest = tree + "/" + f.short_path
        lines.append("%s\t%s" % (f.path, dest))
    for path in runfiles.empty_filenames.to_list():
        lines.append("-\t%s/%s" % (tree, path))
    manifest = ctx.actions.declare_file(ctx.label.name + ".manifest")
    ctx.actions.write(manifest, "\n".join(lines) + "\n")

    out = ctx.outputs.out
    ctx.actions.run_shell(
        inputs = depset([manifest, executable], transitive = [runfiles.files]),
        outputs = [out],
        arguments = [manifest.path, out.path],
        mnemonic = "RunfilesTarball",
        progress_message = "Packing %s with its runfiles" % ctx.attr.binary.label,
        # Copies (not symlinks) into a staging folder, then one reproducible tar: sorted names, fixed
        # owner and time, so the same inputs give the same bytes (and the same image layer).
        command = """
set -euo pipefail
manifest=$1; out=$PWD/$2; stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
while IFS=$'\\t' read -r src dest; do
  mkdir -p "$stage/$(dirname "$dest")"
  if [ "$src" = - ]; then : > "$stage/$dest"; else cp -L "$src" "$stage/$dest"; fi
done < "$manifest"
chmod -R u+rwX,go+rX,go-w "$stage"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -czf "$out" .
""",
    )
    return [DefaultInfo(files = depset([out]))]

runfiles_tarball = rule(
    implementation = _runfiles_tarball_impl,
    doc = "A .tar.gz of a py_binary launcher plus its runfiles (`<prefix>/<pkg>/<name>` + `.runfiles/`).",
    attrs = {
        "binary": attr.label(executable = True, cfg = "target", mandatory = True),
        "prefix": attr.string(default = "app"),
        "out": attr.output(mandatory = True),
    },
)

def infergrid_deploy_targets(name):
    """Declares :image_tar (the deployable artifact) and :manifests for services/<name>.

    :image_tar is bazel-bin/services/<name>/<name>.tar.gz: the :server launcher and its runfiles
    under app/ (run as `app/services/<name>/server`), the payload of deploy/images/Containerfile.
    `bazel run //services/<name>:manifests [-- --overlay dev]` prints the service's objects from
    the kustomize overlay (prod by default), ready for `kubectl apply -f -`.

    Args:
      name: the service package name, e.g. "gateway"; must have a :server py_binary.
    """
    runfiles_tarball(
        name = "image_tar",
        binary = ":server",
        out = name + ".tar.gz",
        visibility = ["//visibility:public"],
    )

    native.py_binary(
        name = "manifests",
        srcs = ["//deploy/k8s:kustomize.py"],
        main = "//deploy/k8s:kustomize.py",
        args = ["--service", name],
        python_version = "PY3",
        srcs_version = "PY3",
        deps = ["//deploy/k8s:kustomize"],
    )

def infergrid_service(name, deps = [], test_size = "medium", test_tags = [], **kwargs):
    """Declares :<name> (py_library), :server (py_binary), :tests (py_pytest), :image_tar and :manifests.

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
        deps = [":" + name, "//libs:testing"],
        tags = test_tags,
        **kwargs
    )

    infergrid_deploy_targets(name)
