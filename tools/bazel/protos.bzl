"""The one proto generation rule for the whole tree: protos/generate.py under Bazel."""

# Fails early with the fix when the python3 on PATH is not the project's virtualenv.
_CHECK_PYTHON = (
    "python3 -c 'import grpc_tools, google.api' 2>/dev/null || " +
    "{{ echo \"protos: $$(command -v python3) cannot import grpc_tools/google.api: " +
    "put the project's .venv/bin first on PATH (make test-bazel does)\" >&2; exit 1; }}; "
)

def _py_outs(proto):
    """Returns the files generate.py writes for one proto path (relative to the proto root)."""
    base = proto[:-len(".proto")]
    return [base + "_pb2.py", base + "_pb2_grpc.py", base + "_pb2.pyi"]

def _init_files(protos):
    """Returns the __init__.py generate.py touches in every package dir of the protos."""
    inits = {}
    for proto in protos:
        parts = proto.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            inits["/".join(parts[:i]) + "/__init__.py"] = True
    return sorted(inits.keys())

def py_proto_tree(name, srcs, generator = "generate.py", visibility = None):
    """Generates Python protobuf/gRPC code and a descriptor set for every proto of this package.

    One genrule runs the same script as `make gen` (protos/generate.py) over all
    srcs into $(RULEDIR), so the package path of each proto is its import path
    (infergrid/gateway/v1/gateway.proto -> infergrid.gateway.v1.gateway_pb2).
    The outs are derived from srcs: adding a .proto needs no BUILD change.

    Targets:
      name + "_gen": the genrule.
      name: py_library of the generated modules, imports = ["."] so they import
        by package path.
      :descriptors.pb (a file): the FileDescriptorSet with imports, for
        Envoy's grpc_json_transcoder (generate.py always names it so).

    Args:
      name: name of the py_library.
      srcs: the .proto files, relative to this package (usually glob(["**/*.proto"])).
      generator: the generation script, in this package.
      visibility: visibility of the py_library.
    """
    py_srcs = []
    pyi = []
    for proto in srcs:
        outs = _py_outs(proto)
        py_srcs += outs[:2]
        pyi.append(outs[2])
    py_srcs += _init_files(srcs)

    native.genrule(
        name = name + "_gen",
        srcs = srcs,
        outs = py_srcs + pyi + ["descriptors.pb"],
        tools = [generator],
        # `python3` is the virtualenv's (PATH comes in through --action_env=PATH,
        # .bazelrc): grpc_tools and googleapis-common-protos live there.
        # --root: the package dir inside the sandbox; protos are passed relative
        # to it so generate.py never resolves the sandbox symlinks to the source tree.
        cmd = (_CHECK_PYTHON + "python3 $(location {gen}) --out $(RULEDIR) --root {root} {protos}").format(
            gen = generator,
            root = native.package_name() or ".",
            protos = " ".join(srcs),
        ),
        message = "Generating Python protobuf/gRPC code and descriptors.pb",
    )

    native.py_library(
        name = name,
        srcs = py_srcs,
        data = pyi,
        imports = ["."],
        srcs_version = "PY3",
        visibility = visibility,
    )
