"""The wire stays at the wire: protobuf messages live in ``orchcore/wire/`` and at the two
edges that must name them, and nowhere else.

The rule, checked on the source of orchcore, orchestrator, worker, bench and the testkit
(but its fuzzer, whose subject is the raw wire):

1. Outside ``orchcore/wire/``, only ``orchestrator/cluster/client.py`` (the stub) and
   ``worker/service.py`` (the servicer) import ``worker_pb2`` or ``worker_pb2_grpc``.
2. In those two, a ``pb.`` name appears only in a type annotation: neither builds a message.
3. In those two, a message is only ever handed to ``convert``, never read:
   - a servicer handler's request is used only as an argument of a ``convert.`` call, and
     the handler returns or yields only ``convert.`` calls;
   - in the client, a unary reply (``self._call(...)``) is at once an argument of a
     ``convert.`` call; a streaming stub call is iterated by a ``for`` or kept in a name
     that is only passed on (to the stream's wrapper); and the variable of a ``for`` over a
     stub call or a kept stream (``self._stream``) is used only as a ``convert.`` argument.

"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchcore.wire import worker_pb2 as pb

ROOT = Path(__file__).parent.parent
PACKAGES = ("orchcore", "orchestrator", "worker", "bench", "testkit")
WIRE = ROOT / "orchcore" / "wire"
RAW_WIRE = {ROOT / "testkit" / "fuzzing.py"}  # speaks raw messages to fuzz the worker
CLIENT = ROOT / "orchestrator" / "cluster" / "client.py"
SERVICE = ROOT / "worker" / "service.py"
GENERATED = ("worker_pb2", "worker_pb2_grpc")
RPCS = set(pb.DESCRIPTOR.services_by_name["Worker"].methods_by_name)


def _imports_generated(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if any(part in GENERATED for name in names for part in name.split(".")):
            return True
    return False


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _is_convert_call(node: ast.AST | None) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "convert")


def _convert_argument(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """``node`` is, as it stands, a positional argument of a ``convert.`` call (a starred
    one too: ``convert.f(*convert.g(msg))`` hands over what ``g`` made)."""
    parent = parents.get(node)
    if isinstance(parent, ast.Starred):
        node, parent = parent, parents.get(parent)
    return _is_convert_call(parent) and node in parent.args


def _annotations(tree: ast.AST) -> set[ast.AST]:
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            roots.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            roots.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
    return {n for root in roots for n in ast.walk(root)}


def _own_nodes(function: ast.FunctionDef) -> list[ast.AST]:
    """The nodes of ``function``'s body, without those of functions defined inside it."""
    found, todo = [], list(function.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def _where(node: ast.AST) -> str:
    return f"line {node.lineno}: {ast.unparse(node)[:80]}"


def pb_outside_annotations(source: str) -> list[str]:
    """Rule 2: uses of ``pb`` that are not type annotations."""
    tree = ast.parse(source)
    annotations = _annotations(tree)
    return [_where(n) for n in ast.walk(tree)
            if isinstance(n, ast.Name) and n.id == "pb" and n not in annotations]


def servicer_reads(source: str) -> list[str]:
    """Rule 3, the servicer: requests not handed to convert, replies not made by it."""
    tree = ast.parse(source)
    parents = _parents(tree)
    problems = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or fn.name not in RPCS:
            continue
        request = fn.args.args[1].arg
        for node in _own_nodes(fn):
            if (isinstance(node, ast.Name) and node.id == request
                    and not _convert_argument(node, parents)):
                problems.append(f"{fn.name} reads its request: {_where(parents[node])}")
            if (isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom))
                    and node.value is not None and not _is_convert_call(node.value)):
                problems.append(f"{fn.name} answers without convert: {_where(node)}")
    return problems


def _is_self_attribute(node: ast.AST, *names: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in names
            and isinstance(node.value, ast.Name) and node.value.id == "self")


def _is_stub_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
        _is_self_attribute(node.func.value, "stub")


def client_reads(source: str) -> list[str]:
    """Rule 3, the client: replies and streamed messages not handed straight to convert."""
    tree = ast.parse(source)
    parents = _parents(tree)
    problems = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            problems += _unary_or_kept(_own_nodes(fn), parents)
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and (_is_stub_call(node.iter) or
                                          _is_self_attribute(node.iter, "_stream")):
            variable = node.target.id
            for use in ast.walk(ast.Module(body=node.body, type_ignores=[])):
                if (isinstance(use, ast.Name) and use.id == variable
                        and not _convert_argument(use, parents)):
                    problems.append(f"a streamed message read: {_where(parents[use])}")
    return problems


def _unary_or_kept(nodes: list[ast.AST], parents: dict[ast.AST, ast.AST]) -> list[str]:
    """Within one function: unary replies straight into convert, streams iterated or kept
    in a name only passed on."""
    problems, kept = [], set()
    for node in nodes:
        if (isinstance(node, ast.Call) and _is_self_attribute(node.func, "_call")
                and not _convert_argument(node, parents)):
            problems.append(f"a reply read outside convert: {_where(parents[node])}")
        if _is_stub_call(node):
            parent = parents[node]
            if isinstance(parent, ast.For) and parent.iter is node:
                continue
            if isinstance(parent, ast.Assign) and all(isinstance(t, ast.Name)
                                                      for t in parent.targets):
                kept |= {t.id for t in parent.targets}
                continue
            problems.append(f"a stub call neither iterated nor kept: {_where(parent)}")
    for node in nodes:
        if (isinstance(node, ast.Name) and node.id in kept and isinstance(node.ctx, ast.Load)
                and not isinstance(parents[node], ast.Call)):
            problems.append(f"a kept stream read: {_where(parents[node])}")
    return problems


def test_only_the_client_and_the_servicer_import_the_generated_modules():
    importers = sorted(
        str(path.relative_to(ROOT)) for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if WIRE not in path.parents and path not in RAW_WIRE
        and _imports_generated(ast.parse(path.read_text())))
    assert importers == ["orchestrator/cluster/client.py", "worker/service.py"], \
        "only the client and the servicer may name protobuf modules; convert in orchcore/wire"


@pytest.mark.parametrize("path", [CLIENT, SERVICE], ids=["client", "service"])
def test_the_edges_build_no_message(path):
    assert pb_outside_annotations(path.read_text()) == []


def test_the_servicer_hands_every_request_and_reply_to_convert():
    assert servicer_reads(SERVICE.read_text()) == []


def test_the_client_hands_every_reply_to_convert():
    assert client_reads(CLIENT.read_text()) == []


def test_the_rules_catch_what_they_are_for():
    """Each check finds the slip it exists for (a rule that cannot fail guards nothing)."""
    assert pb_outside_annotations("def f(r: pb.A) -> pb.B:\n    return pb.B(x=1)\n")
    assert not pb_outside_annotations("def f(r: pb.A) -> pb.B:\n    return convert.b(r)\n")
    handler = "class S:\n    def Renew(self, request, context):\n        {}\n"
    assert servicer_reads(handler.format("return convert.renewed(request.holder == 'x')"))
    assert servicer_reads(handler.format("return pb.RenewReply(held=True)"))
    assert not servicer_reads(handler.format(
        "return convert.renewed(self.renew(convert.lease(request)))"))
    assert client_reads("def f(self):\n    return self._call(self.stub.Renew, r, 1).held\n")
    assert client_reads("def f(self):\n    return self.stub.Info(r).worker_id\n")
    assert client_reads("def f(self):\n    for m in self.stub.Fetch(r):\n"
                        "        g(m.done)\n")
    assert client_reads("def f(self):\n    call = self.stub.Results(r)\n"
                        "    return call.code()\n")
    assert not client_reads("def f(self):\n    for m in self.stub.Fetch(r):\n"
                            "        g(convert.progress(m))\n"
                            "    return convert.b(self._call(self.stub.Info, r, 1))\n")
