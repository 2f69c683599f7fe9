"""The engine: a batch of records in; scores, alerts and dead letters out.

Per-key state lives in numpy arenas and one onnxruntime session scores many keys at once. Of
the rest of `detector` it knows only the contract: no Kafka, key-state storage or files.
"""
