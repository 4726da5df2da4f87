"""Compile-time patches of upstream internals (ExecuTorch, torch, torchao) the build runs under.

Each one removes work that cannot change the program (the bytes written are the same with and
without them): :mod:`.fewer_retraces`, :mod:`.faster_partitioner`, :mod:`.lazy_recompile`,
:mod:`.quant_shape_rules`.
"""
