"""faster_partitioner: the merge check gives ExecuTorch's answer on every pair of partitions of
random graphs (hypothesis), and is installed only inside the context."""

from __future__ import annotations

import operator

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.infra.partitioner import Partition
from torch.fx.passes.operator_support import OperatorSupportBase

from fxport.builder.speedups.faster_partitioner import can_merge_partitions, faster_partitioner


class _All(OperatorSupportBase):
    def is_node_supported(self, submodules, node):
        return node.op == "call_function"


def _random_graph(data, n: int) -> torch.fx.GraphModule:
    """A DAG of ``n`` adds, each reading one or two earlier values (inputs included)."""
    graph = torch.fx.Graph()
    values = [graph.placeholder("x"), graph.placeholder("y")]
    for _ in range(n):
        a = data.draw(st.sampled_from(values))
        b = data.draw(st.sampled_from(values))
        values.append(graph.call_function(operator.add, (a, b)))
    graph.output(tuple(values[2:]))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(4, 24))
def test_same_answer_as_executorch(data, n):
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner

    gm = _random_graph(data, n)
    partitioner = GroupBasedPartitioner(gm, _All())
    ops = [node for node in gm.graph.nodes if node.op == "call_function"]
    labels = data.draw(st.lists(st.integers(0, 4), min_size=len(ops), max_size=len(ops)))
    partitions = {}
    for node, label in zip(ops, labels):
        partitions.setdefault(label, Partition(label)).add_node(node)
    upstream = GroupBasedPartitioner.__dict__["_can_merge_partitions"]
    for p1 in partitions:
        for p2 in partitions:
            if p1 != p2:
                assert can_merge_partitions(partitioner, p1, p2, partitions) == upstream(partitioner, p1, p2, partitions)


def test_a_merge_around_an_outside_node_is_refused():
    """x -> a -> b -> c: merging {a} and {c} would put b (outside) both after and before the merged
    partition; {a} and {b} merge."""
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(operator.neg, (x,))
    b = graph.call_function(operator.neg, (a,))
    c = graph.call_function(operator.neg, (b,))
    graph.output(c)
    partitioner = GroupBasedPartitioner(torch.fx.GraphModule(torch.nn.Module(), graph), _All())
    partitions = {0: Partition(0, [a]), 1: Partition(1, [b]), 2: Partition(2, [c])}
    assert can_merge_partitions(partitioner, 0, 2, partitions) is False
    assert can_merge_partitions(partitioner, 0, 1, partitions) is True


def test_installed_only_inside_the_context():
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner

    upstream = GroupBasedPartitioner.__dict__["_can_merge_partitions"]
    with faster_partitioner():
        assert GroupBasedPartitioner._can_merge_partitions is can_merge_partitions
    assert GroupBasedPartitioner.__dict__["_can_merge_partitions"] is upstream
