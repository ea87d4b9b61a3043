"""Records: what detection emits (``raw``: cheap tuples, no tensors held), the bounded buffer
with exact counts (``buffer``), and the emitter that warns, raises and feeds the sinks (``emit``)."""
