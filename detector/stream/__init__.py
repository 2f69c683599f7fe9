"""The daemon's processing loop and its Kafka edge: the input, the delivery of outputs."""
