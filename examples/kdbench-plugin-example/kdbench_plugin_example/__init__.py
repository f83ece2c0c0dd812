"""kdbench-plugin-example: the NKD method and the ``cnn_micro`` student, added to kdbench by entry points."""
