"""What the tests and benchmarks share: brokers, topics and consumer processes (`harness`),
raw records in and out (`raw_kafka`), usage queries, waiting, model-free engines and
backends, and the random EXL2 models the GPU tests build."""
