"""One module per DAG stage: parse arguments, read inputs, call `pipeline`, write outputs."""
